"""Padding-free batches: every sequence of a batch laid end to end in one row, no pad token computed.

Attention must not cross sequence boundaries. The model runs with the attention implementation
`modpo_varlen`, registered here: it reads the cumulative sequence lengths (`cu_seq_lens_q`) that
transformers passes through to attention layers, and calls PyTorch's variable-length flash attention
on CUDA, or plain causal SDPA per sequence elsewhere. Position ids restart at 0 for each sequence.

Prefix sharing (`pack_shared_prompt`) goes further: a pair's chosen and rejected responses share the
prompt, so the prompt runs once and the rejected response reads the prompt's keys and values.
Models already on flash-attention implementations keep their own kernels for plain packing.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging

import torch
import torch.nn.functional as F
from modpo.errors import ConfigError

logger = logging.getLogger(__name__)

VARLEN = "modpo_varlen"
NATIVE_VARLEN = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn", "kernels-community/flash-attn3")


def scored_tokens(layout: list[tuple[int, int, list[int]]]) -> dict[str, torch.Tensor]:
    """Which hidden state scores which response token. `layout` holds, per sequence, (position of the hidden
    state that predicts its first response token, position of that first token, response ids); later tokens
    are each predicted by the hidden state of the token before them.

    Returns `score_positions` (flat positions into the batch), `score_targets` (token ids) and
    `score_sequences` (sequence numbers), the inputs of `modpo.logps.sequence_logps`.
    """
    positions, targets, sequences = [], [], []
    for number, (first, start, response) in enumerate(layout):
        positions += [first] + list(range(start, start + len(response) - 1))
        targets += list(response)
        sequences += [number] * len(response)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)
    return {"score_positions": as_long(positions), "score_targets": as_long(targets),
            "score_sequences": as_long(sequences)}


def _filler(total: int, pad_to_multiple_of: int | None) -> int:
    return (-total) % pad_to_multiple_of if pad_to_multiple_of else 0


def _cumulative(lengths: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu


def _flat(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([x for row in rows for x in row], dtype=torch.long)[None]


def pack(prompts: list[list[int]], responses: list[list[int]], pad_token_id: int,
         pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """One row holding every prompt+response sequence end to end. With `pad_to_multiple_of`, a filler sequence
    rounds the length up (so that compiled kernels see few distinct shapes); the filler is never scored."""
    sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
    lengths = [len(s) for s in sequences]
    filler = _filler(sum(lengths), pad_to_multiple_of)
    if filler:
        sequences.append([pad_token_id] * filler)
        lengths.append(filler)
    cu = _cumulative(lengths)
    starts = cu[:-1].tolist()
    return {
        "input_ids": _flat(sequences),
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "sequence_index": torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None],
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths),
        **scored_tokens([(s + len(p) - 1, s + len(p), r) for s, p, r in zip(starts, prompts, responses)]),
    }


def pack_shared_prompt(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]],
                       pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Prefix sharing: every prompt runs once. Sequences 0..B-1 are prompt+chosen, B..2B-1 prompt+rejected.

    The row is [p_0 c_0  p_1 c_1  ...  filler | r_0 r_1 ...]. The first part is packed causal attention; each
    rejected response r_i attends to its prompt's keys and then its own, and its positions continue from the
    prompt's, so it sees exactly what it would see in its own sequence p_i r_i.
    """
    first = [list(p) + list(c) for p, c in zip(prompts, chosen)]
    lengths = [len(s) for s in first]
    filler = _filler(sum(lengths) + sum(len(r) for r in rejected), pad_to_multiple_of)
    if filler:
        first.append([pad_token_id] * filler)
        lengths.append(filler)
    split = sum(lengths)
    cu = _cumulative(lengths)
    starts = cu[:-1].tolist()
    rejected_starts = (split + _cumulative([len(r) for r in rejected])[:-1]).tolist()
    pairs = len(prompts)
    key_index = []
    for start, p, rejected_start, r in zip(starts, prompts, rejected_starts, rejected):
        key_index += list(range(start, start + len(p))) + list(range(rejected_start, rejected_start + len(r)))
    rejected_lengths = [len(r) for r in rejected]
    rejected_key_lengths = [len(p) + len(r) for p, r in zip(prompts, rejected)]
    positions = [torch.arange(n) for n in lengths] + [torch.arange(len(p), len(p) + len(r)) for p, r in zip(prompts, rejected)]
    sequence_of = list(range(pairs)) + ([2 * pairs] if filler else []) + list(range(pairs, 2 * pairs))
    layout = ([(s + len(p) - 1, s + len(p), c) for s, p, c in zip(starts, prompts, chosen)]
              + [(s + len(p) - 1, rs, r) for s, p, rs, r in zip(starts, prompts, rejected_starts, rejected)])
    return {
        "input_ids": torch.cat([_flat(first), _flat(rejected)], dim=1),
        "position_ids": torch.cat(positions)[None],
        "sequence_index": torch.repeat_interleave(torch.tensor(sequence_of), torch.tensor(lengths + rejected_lengths))[None],
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths),
        "rejected_offset": split, "rejected_key_index": torch.tensor(key_index, dtype=torch.long),
        "rejected_cu_seq_lens_q": _cumulative(rejected_lengths), "rejected_cu_seq_lens_k": _cumulative(rejected_key_lengths),
        "rejected_max_length_q": max(rejected_lengths), "rejected_max_length_k": max(rejected_key_lengths),
        **scored_tokens(layout),
    }


def flash_kernel(q: torch.Tensor):
    """PyTorch's variable-length flash attention where it runs (CUDA, half precision), else None."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _parameters(kernel) -> frozenset:
    return frozenset(inspect.signature(kernel).parameters)


def _flash_varlen(varlen_attn, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float | None) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    params = _parameters(varlen_attn)  # the keyword names changed across torch releases
    extra = {"scale": scale}
    if "is_causal" in params:
        extra["is_causal"] = True
    else:
        extra["window_size"] = (-1, 0)
    if groups > 1 and "enable_gqa" in params:
        extra["enable_gqa"] = True
    elif groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **extra)


def _sdpa_varlen(q, k, v, cu_q, cu_k, scale: float | None) -> torch.Tensor:
    pieces = []
    for q0, q1, k0, k1 in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        n_q, n_k = q1 - q0, k1 - k0
        mask = None if n_q == n_k else torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        pieces.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale,
                                                     enable_gqa=q.shape[1] != k.shape[1])[0].transpose(0, 1))
    return torch.cat(pieces)


def _flash_aligns_bottom_right(kernel, device: torch.device, dtype: torch.dtype) -> bool:
    """Does the flash kernel align causal masks bottom-right when a segment has fewer queries than keys?
    Checked on a small random case, against SDPA with the explicit mask."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 2, 64, generator=generator).to(device, dtype) for n in (3, 7, 7))
    cu_q, cu_k = (torch.tensor([0, n], dtype=torch.int32, device=device) for n in (3, 7))
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        flash = _flash_varlen(kernel, q, k, v, cu_q, cu_k, 3, 7, None).float()
        expected = _sdpa_varlen(q.float(), k.float(), v.float(), cu_q, cu_k, None)
    aligned = torch.allclose(flash, expected, atol=3e-2)
    if not aligned:
        logger.warning("the variable-length flash kernel does not align causal masks bottom-right; prefix sharing "
                       "falls back to per-sequence SDPA (correct, slower)")
    return aligned


# (kernel, device, dtype) -> whether the kernel aligns causal masks bottom-right: checked once each. `sequence_logps`
# fills it before the model runs (`check_flash_alignment`), so that a compiled forward only reads a dict: the check
# itself (host syncs, a per-segment loop) would break torch.compile's graph inside every attention layer.
_BOTTOM_RIGHT: dict = {}


def _aligns_bottom_right(kernel, device: torch.device, dtype: torch.dtype) -> bool:
    key = (kernel, device, dtype)
    if key not in _BOTTOM_RIGHT:
        _BOTTOM_RIGHT[key] = _flash_aligns_bottom_right(kernel, device, dtype)
    return _BOTTOM_RIGHT[key]


def check_flash_alignment(device: torch.device, dtype: torch.dtype) -> None:
    """Run the flash kernel's alignment check for `device` and `dtype` now, outside the model's forward."""
    kernel = flash_kernel(torch.empty(0, device=device, dtype=dtype))
    if kernel is not None:
        _aligns_bottom_right(kernel, torch.device(device), dtype)


def causal_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float | None) -> torch.Tensor:
    """Causal attention over packed segments: (T_q, H, D) queries, (T_k, H_kv, D) keys/values -> (T_q, H, D).

    Segment i holds queries cu_q[i]:cu_q[i+1] and keys cu_k[i]:cu_k[i+1]. Where a segment has fewer queries
    than keys, the queries are its last positions (bottom-right causal alignment, as in flash attention):
    query j attends to keys 0 .. j + (keys - queries). PyTorch's variable-length flash attention on CUDA
    in half precision; per-segment SDPA elsewhere.
    """
    kernel = flash_kernel(q)
    if kernel is not None and (cu_q is cu_k or _aligns_bottom_right(kernel, q.device, q.dtype)):
        return _flash_varlen(kernel, q, k, v, cu_q, cu_k, max_q, max_k, scale)
    return _sdpa_varlen(q, k, v, cu_q, cu_k, scale)


def _check_supported(module, kwargs) -> None:
    """Refuse attention variants this function does not compute, rather than return something else."""

    model = type(module).__name__.removesuffix("Attention") or type(module).__name__
    if kwargs.get("softcap") is not None:
        raise ConfigError(f"padding_free/prefix_sharing: {model} soft-caps its attention scores, which packed "
                          "attention does not do; set padding_free=false and prefix_sharing=false")
    window = kwargs.get("sliding_window")
    longest = max(int(kwargs["max_length_k"]), int(kwargs.get("rejected_max_length_k") or 0))
    if window is not None and longest > window:
        raise ConfigError(f"padding_free/prefix_sharing: {model} uses sliding-window attention ({window} tokens) "
                          f"and a packed sequence is {longest} tokens long; packed attention has no window. Set "
                          "padding_free=false and prefix_sharing=false, or keep sequences within the window")


def varlen_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function over packed sequences. query: (1, H, T, D) -> output (1, T, H, D).

    With prefix sharing (`pack_shared_prompt`), the row's first part holds prompt+chosen segments and its
    second part the rejected responses, whose keys are their prompt's keys followed by their own.
    """
    _check_supported(module, kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        # RoPE in an fp32 residual stream promotes q, k to fp32; flash kernels want the autocast dtype.
        half = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(half), k.to(half), v.to(half)
    cu, max_len = kwargs["cu_seq_lens_q"], int(kwargs["max_length_q"])
    split = kwargs.get("rejected_offset")
    if split is None:
        return causal_varlen(q, k, v, cu, cu, max_len, max_len, scaling)[None], None
    first = causal_varlen(q[:split], k[:split], v[:split], cu, cu, max_len, max_len, scaling)
    keys = kwargs["rejected_key_index"]
    second = causal_varlen(q[split:], k[keys], v[keys], kwargs["rejected_cu_seq_lens_q"], kwargs["rejected_cu_seq_lens_k"],
                           int(kwargs["rejected_max_length_q"]), int(kwargs["rejected_max_length_k"]), scaling)
    return torch.cat([first, second])[None], None


def _no_mask(*args, **kwargs):
    return None


def register() -> None:
    """Make `modpo_varlen` a known attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, _no_mask)


def use_padding_free(model: torch.nn.Module, prefix_sharing: bool = False) -> None:
    """Switch `model` to packed-sequence attention. A model with a native variable-length kernel keeps it for
    plain packing; prefix sharing always needs `modpo_varlen`, the only one that knows its layout."""
    inner = getattr(model, "module", model)
    config = inner.config
    if getattr(config, "_attn_implementation", None) in NATIVE_VARLEN and not prefix_sharing:
        return
    register()
    if hasattr(inner, "set_attn_implementation"):
        inner.set_attn_implementation(VARLEN)
    else:
        config._attn_implementation = VARLEN


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module, prefix_sharing: bool = False):
    """`use_padding_free` for the duration of a block; the model's attention implementation is restored after."""
    inner = getattr(model, "module", model)
    before = getattr(inner.config, "_attn_implementation", None)
    use_padding_free(model, prefix_sharing)
    try:
        yield model
    finally:
        if getattr(inner.config, "_attn_implementation", None) != before and before is not None:
            if hasattr(inner, "set_attn_implementation"):
                inner.set_attn_implementation(before)
            else:
                inner.config._attn_implementation = before
