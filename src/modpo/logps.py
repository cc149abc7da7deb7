"""Summed log-probabilities of response tokens, log pi(y|x) = sum_t log pi(y_t | x, y_<t).

Two ways to get them, with the same result:

* full: run the model, take the logits at response positions, log-softmax in fp32.
* chunked (default where the model allows it): run the model with its LM head bypassed, then apply the
  head to the response positions a chunk at a time, recomputing each chunk in backward. Full-vocabulary
  fp32 logits never exist for more than one chunk, and the head never runs on prompt or pad tokens.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Chunk size is chosen so that one chunk of fp32 logits holds about this many elements (256 MiB).
LOGITS_ELEMENTS_PER_CHUNK = 1 << 26


def _output_head(model: torch.nn.Module) -> torch.nn.Module | None:
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


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
    logits = F.linear(hidden, weight, bias).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_token_logps(hidden, weight, bias, targets, chunk_size: int) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias)[targets] for rows of `hidden`, one chunk of rows at a time."""
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            pieces.append(checkpoint(_token_logps, h, weight, bias, t, use_reentrant=False))
        else:
            pieces.append(_token_logps(h, weight, bias, t))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    response_mask: torch.Tensor,
    chunked: bool = True,
    position_ids: torch.Tensor | None = None,
    sequence_index: torch.Tensor | None = None,
    num_sequences: int | None = None,
    **model_inputs,
) -> torch.Tensor:
    """Sum of log pi(token) over positions where `response_mask` is 1, per sequence: shape (S,), fp32.

    `response_mask[b, t] = 1` marks input_ids[b, t] as a response token (scored given everything before it).
    Padded batches have one sequence per row. Packed batches (`modpo.packing`) hold several sequences in a
    row: `sequence_index[b, t]` says which, and `model_inputs` carries the variable-length attention inputs.
    """
    targets_mask = response_mask[:, 1:].bool()
    targets = input_ids[:, 1:][targets_mask]
    if sequence_index is None:
        sequence_index = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
        num_sequences = input_ids.shape[0]
    sequence_of_token = sequence_index[:, 1:][targets_mask]
    head = _output_head(model) if chunked else None
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False, **model_inputs}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if head is not None:
        with _bypassed(model, head):
            hidden = model(**kwargs).logits
        hidden = hidden[:, :-1][targets_mask]
        chunk = max(1, LOGITS_ELEMENTS_PER_CHUNK // head.out_features)
        token_logps = chunked_token_logps(hidden, head.weight, head.bias, targets, chunk)
    else:
        logits = model(**kwargs).logits[:, :-1][targets_mask].float()
        token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    out = torch.zeros(num_sequences, dtype=torch.float32, device=input_ids.device)
    return out.index_add(0, sequence_of_token, token_logps)


@torch.inference_mode()
def batched_sequence_logps(model, prompt_ids: list, response_ids: list, pad_token_id: int, batch_size: int = 16,
                           desc: str = "log-probs") -> torch.Tensor:
    """log pi(response | prompt) for many pairs, in inference mode, longest first (shape (N,), fp32, CPU).

    Sorting by length keeps padding small and puts any out-of-memory failure at the first batch.
    """
    from tqdm.auto import tqdm

    from modpo.data.formats import pad

    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: -(len(prompt_ids[i]) + len(response_ids[i])))
    out = torch.zeros(len(order), dtype=torch.float32)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        rows = order[start : start + batch_size]
        sequences = [list(prompt_ids[i]) + list(response_ids[i]) for i in rows]
        masks = [[0] * len(prompt_ids[i]) + [1] * len(response_ids[i]) for i in rows]
        input_ids = pad(sequences, pad_token_id).to(device)
        attention_mask = pad([[1] * len(s) for s in sequences], 0).to(device)
        response_mask = pad(masks, 0).to(device)
        out[rows] = sequence_logps(model, input_ids, attention_mask, response_mask).float().cpu()
    model.train(was_training)
    return out
