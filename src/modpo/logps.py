"""Summed log-probabilities of response tokens, log pi(y|x) = sum_t log pi(y_t | x, y_<t).

Two ways to get them, with the same result:

* full: run the model, take the logits at response positions, log-softmax in fp32.
* chunked (default where the model allows it): run the model with its LM head bypassed, then apply the
  head to the response positions a chunk at a time (`_ChunkedLinearLogProb`), recomputing each chunk in
  backward. Full-vocabulary fp32 logits never exist for more than one chunk, and the head never runs on
  prompt or pad tokens.

The list of configurations in `output_head` only pre-filters: before a model's first batched scoring, and at
trainer start-up, `chunked_head_agrees` scores a row or two both ways and turns chunking off for a model whose
forward changes its logits beyond the LM head in a way the bypass does not carry over (a soft cap, an offset;
a plain multiplier such as FalconH1's `lm_head_multiplier` commutes with the head and keeps chunking).
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch
import torch.nn.functional as F
from modpo.batch import concatenated_inputs, pad, to_device
from modpo.packing import check_flash_alignment, packed_attention
from modpo.progress import bar

logger = logging.getLogger(__name__)

# Chunk size is chosen so that one chunk of fp32 logits holds about this many elements (256 MiB).
LOGITS_ELEMENTS_PER_CHUNK = 1 << 26


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The LM head as a plain Linear, or None where chunking would change the model's maths."""
    inner = getattr(model, "module", model)  # DDP-style wrappers
    config = getattr(inner, "config", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if get_head else None
    if not isinstance(head, torch.nn.Linear) or config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for unusual in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        if getattr(text_config, unusual, None) not in (None, 1, 1.0):
            return None
    return head


@contextlib.contextmanager
def _bypassed(model: torch.nn.Module, head: torch.nn.Module):
    """Replace the output head by the identity, so the forward pass returns hidden states as `logits`."""
    inner = getattr(model, "module", model)
    inner.set_output_embeddings(torch.nn.Identity())
    try:
        yield
    finally:
        inner.set_output_embeddings(head)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick for this device, else the tensor's own."""
    kind = tensor.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return tensor.dtype


class _ChunkedLinearLogProb(torch.autograd.Function):
    """log softmax(h W^T + b)[target] per row, chunk by chunk; backward recomputes each chunk's logits.

    Saves only the inputs and one fp32 log-normaliser per row: no chunk of logits outlives its loop turn.
    Gradient of row t's output: d/dlogits = onehot(target) - softmax, scaled by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, dtype):
        h, w = hidden.to(dtype), weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = F.linear(h[rows], w, b).float()
            lse[rows] = torch.logsumexp(logits, dim=-1)
            out[rows] = logits.gather(-1, targets[rows, None]).squeeze(-1) - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        h, w = hidden.to(ctx.dtype), weight.to(ctx.dtype)
        b = bias.to(ctx.dtype) if bias is not None else None
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            # g * (onehot - softmax), in place on the chunk's logits: one vocabulary-sized buffer per chunk
            grad_logits = F.linear(h[rows], w, b).float().sub_(lse[rows, None]).exp_()
            g = grad_out[rows, None].float()
            grad_logits.mul_(-g).scatter_add_(-1, targets[rows, None], g)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(ctx.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h[rows]).float()
        return (grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None,
                grad_bias.to(bias.dtype) if grad_bias is not None else None, None, None, None)


def chunked_token_logps(hidden, weight, bias, targets, chunk_size: int) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias)[targets] for rows of `hidden`, one chunk of rows at a time.

    The matmuls run in autocast's dtype when autocast is on (the weight is cast once, not per chunk);
    log-softmax is always fp32.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    dtype = _compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLinearLogProb.apply(hidden, weight, bias, targets, chunk_size, dtype)


def scoring_from_response_mask(input_ids: torch.Tensor, response_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """`score_*` inputs of `sequence_logps` for a padded batch, one sequence per row, from its response mask
    (`response_mask[b, t] = 1`: input_ids[b, t] is a response token, scored given everything before it)."""
    rows, columns = response_mask[:, 1:].nonzero(as_tuple=True)
    return {"score_positions": rows * input_ids.shape[1] + columns, "score_targets": input_ids[rows, columns + 1],
            "score_sequences": rows}


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    chunked: bool = True,
    score_positions: torch.Tensor | None = None,
    score_targets: torch.Tensor | None = None,
    score_sequences: torch.Tensor | None = None,
    num_sequences: int | None = None,
    **model_inputs,
) -> torch.Tensor:
    """Sum of log pi(token) over the response tokens of each sequence: shape (num_sequences,), fp32.

    Which tokens: either `response_mask` (padded batches, one sequence per row), or the `score_*` tensors the
    collators build for every layout (`modpo.packing.scored_tokens`): the hidden state at flat position
    score_positions[i] predicts token score_targets[i] of sequence score_sequences[i]. `model_inputs` carries
    position ids and the variable-length attention inputs of packed batches.
    """
    if score_positions is None:
        score_positions, score_targets, score_sequences = scoring_from_response_mask(input_ids, response_mask).values()
        num_sequences = input_ids.shape[0]
    model_inputs.pop("sequence_index", None)  # which sequence each token belongs to: bookkeeping, not a model input
    if "rejected_offset" in model_inputs:  # prefix sharing: decide the attention kernel before a compiled forward

        check_flash_alignment(input_ids.device, _compute_dtype(next(model.parameters())))
    head = output_head(model) if chunked else None
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False, **model_inputs}
    if head is not None:
        with _bypassed(model, head):
            hidden = model(**kwargs).logits
        hidden = hidden.flatten(0, 1)[score_positions]
        chunk = max(1, LOGITS_ELEMENTS_PER_CHUNK // head.out_features)
        token_logps = chunked_token_logps(hidden, head.weight, head.bias, score_targets, chunk)
    else:
        logits = model(**kwargs).logits.flatten(0, 1)[score_positions].float()
        token_logps = logits.gather(-1, score_targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    out = torch.zeros(num_sequences, dtype=torch.float32, device=input_ids.device)
    return out.index_add(0, score_sequences, token_logps)


def padded_batch(prompt_ids: list, response_ids: list, pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """`sequence_logps` inputs for prompt + response sequences, one per row, right-padded."""

    sequences = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    masks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompt_ids, response_ids)]
    return {"input_ids": pad(sequences, pad_token_id).to(device),
            "attention_mask": pad([[1] * len(s) for s in sequences], 0).to(device),
            "response_mask": pad(masks, 0).to(device)}


# Model -> whether its chunked head reproduced its full logits: each model is checked (and warned about) once.
_HEAD_AGREES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def chunked_head_agrees(model: torch.nn.Module, prompt_ids: list, response_ids: list, pad_token_id: int) -> bool:
    """Whether chunked scoring gives the model's full-logit log-probs on these (one or two) sequences.

    Relative tolerance 1e-4 in fp32, 2e-2 under autocast. A model that fails is named in one warning and
    remembered, so its later checks return False without scoring.
    """
    inner = getattr(model, "module", model)
    if output_head(model) is None or not prompt_ids:
        return True  # nothing is chunked (or nothing to check with)
    if inner in _HEAD_AGREES:
        return _HEAD_AGREES[inner]
    device = next(model.parameters()).device
    batch = padded_batch(prompt_ids, response_ids, pad_token_id, device)
    was_training = model.training
    model.eval()
    try:
        chunked = sequence_logps(model, chunked=True, **batch).float()
        full = sequence_logps(model, chunked=False, **batch).float()
    finally:
        model.train(was_training)
    difference = ((chunked - full).abs() / full.abs().clamp(min=1)).max().item()
    agrees = difference <= (2e-2 if torch.is_autocast_enabled(device.type) else 1e-4)
    if not agrees:
        logger.warning("chunked LM head turned off for %s: its log-probs differ from the full logits' by %.2g relative "
                       "(its forward changes the logits beyond the LM head); scoring it with full logits",
                       type(inner).__name__, difference)
    _HEAD_AGREES[inner] = agrees
    return agrees


@torch.inference_mode()
def batched_sequence_logps(model, prompt_ids: list, response_ids: list, pad_token_id: int, batch_size: int = 16,
                           desc: str = "log-probs", chunked: bool = True) -> torch.Tensor:
    """log pi(response | prompt) for many pairs, in inference mode, longest first (shape (N,), fp32, CPU).

    Sorting by length keeps padding small and puts any out-of-memory failure at the first batch. The chunked
    head is used where it reproduces the full logits on the first two rows (`chunked_head_agrees`).
    """
    device = next(model.parameters()).device
    chunked = chunked and chunked_head_agrees(model, prompt_ids[:2], response_ids[:2], pad_token_id)
    order = sorted(range(len(prompt_ids)), key=lambda i: -(len(prompt_ids[i]) + len(response_ids[i])))
    out = torch.zeros(len(order), dtype=torch.float32)
    was_training = model.training
    model.eval()
    for start in bar(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        rows = order[start : start + batch_size]
        batch = padded_batch([prompt_ids[i] for i in rows], [response_ids[i] for i in rows], pad_token_id, device)
        out[rows] = sequence_logps(model, chunked=chunked, **batch).float().cpu()
    model.train(was_training)
    return out


@torch.inference_mode()
def batched_pair_logps(model, prompt_ids: list, chosen_ids: list, rejected_ids: list, pad_token_id: int,
                       batch_size: int = 16, desc: str = "log-probs",
                       chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(chosen | prompt), log pi(rejected | prompt)) for many pairs with prefix sharing: each prompt runs once
    (`modpo.packing.pack_shared_prompt`), `batch_size` sequences (batch_size // 2 pairs) per forward, longest first.
    Same values as two `batched_sequence_logps` calls, in fewer token passes. Shapes (N,), fp32, CPU."""
    device = next(model.parameters()).device
    chunked = chunked and chunked_head_agrees(model, [*prompt_ids[:1]] * 2, [*chosen_ids[:1], *rejected_ids[:1]],
                                              pad_token_id)
    pairs_per_batch = max(1, batch_size // 2)
    length = lambda i: len(prompt_ids[i]) + len(chosen_ids[i]) + len(rejected_ids[i])
    order = sorted(range(len(prompt_ids)), key=lambda i: -length(i))
    chosen, rejected = torch.zeros(len(order)), torch.zeros(len(order))
    was_training = model.training
    model.eval()
    with packed_attention(model, prefix_sharing=True):
        for start in bar(range(0, len(order), pairs_per_batch), desc=desc, unit="batch", leave=False):
            rows = order[start : start + pairs_per_batch]
            batch = concatenated_inputs([prompt_ids[i] for i in rows], [chosen_ids[i] for i in rows],
                                        [rejected_ids[i] for i in rows], pad_token_id, prefix_sharing=True)
            values = sequence_logps(model, chunked=chunked, num_sequences=2 * len(rows),
                                    **to_device(batch, device)).float().cpu()
            chosen[rows], rejected[rows] = values[: len(rows)], values[len(rows) :]
    model.train(was_training)
    return chosen, rejected
