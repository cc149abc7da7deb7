"""Padding-free batches: every sequence of a batch laid end to end in one row, no pad token computed.

Attention must not cross sequence boundaries. The model runs with the attention implementation
`modpo_varlen`, registered here: it reads the cumulative sequence lengths (`cu_seq_lens_q`) that
transformers passes through to attention layers, and calls PyTorch's variable-length flash attention
on CUDA, or plain causal SDPA per sequence elsewhere. Position ids restart at 0 for each sequence.
Models already on flash-attention implementations use their own kernels with the same inputs.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

VARLEN = "modpo_varlen"
NATIVE_VARLEN = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn", "kernels-community/flash-attn3")


def pack(sequences: list[list[int]], response_masks: list[list[int]], pad_token_id: int,
         pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """One row holding all `sequences`; with `pad_to_multiple_of`, a filler sequence rounds the length up
    (so that compiled kernels see few distinct shapes). The filler is never scored."""
    lengths = [len(s) for s in sequences]
    total = sum(lengths)
    filler = (-total) % pad_to_multiple_of if pad_to_multiple_of else 0
    if filler:
        sequences = list(sequences) + [[pad_token_id] * filler]
        response_masks = list(response_masks) + [[0] * filler]
        lengths = lengths + [filler]
    flat = lambda rows: torch.tensor([x for row in rows for x in row], dtype=torch.long)[None]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return {
        "input_ids": flat(sequences),
        "response_mask": flat(response_masks),
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "sequence_index": torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }


def _cuda_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function over packed sequences. query: (1, H, T, D) -> output (1, T, H, D)."""
    cu = kwargs["cu_seq_lens_q"]
    max_len = int(kwargs["max_length_q"])
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    groups = q.shape[1] // k.shape[1]
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        # RoPE in an fp32 residual stream promotes q, k to fp32; flash kernels want the autocast dtype.
        half = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(half), k.to(half), v.to(half)
    varlen_attn = _cuda_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if varlen_attn is not None:
        params = inspect.signature(varlen_attn).parameters
        extra = {"scale": scaling}
        if "is_causal" in params:
            extra["is_causal"] = True
        else:
            extra["window_size"] = (-1, 0)
        if groups > 1 and "enable_gqa" in params:
            extra["enable_gqa"] = True
        elif groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)
    else:
        pieces = []
        bounds = cu.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, n, D)
            pieces.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling,
                                                         enable_gqa=groups > 1)[0].transpose(0, 1))
        out = torch.cat(pieces)
    return out[None], None


def _no_mask(*args, **kwargs):
    return None


def register() -> None:
    """Make `modpo_varlen` a known attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, _no_mask)


def use_padding_free(model: torch.nn.Module) -> None:
    """Switch `model` to packed-sequence attention unless it already has a native variable-length kernel."""
    inner = getattr(model, "module", model)
    config = inner.config
    if getattr(config, "_attn_implementation", None) in NATIVE_VARLEN:
        return
    register()
    if hasattr(inner, "set_attn_implementation"):
        inner.set_attn_implementation(VARLEN)
    else:
        config._attn_implementation = VARLEN
