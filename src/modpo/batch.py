"""Token ids -> batches: every pair's chosen then rejected sequence laid out so one forward pass scores both.

Layouts: right-padded rows; one packed row without padding (`padding_free`); one packed row in which each
prompt appears once (`prefix_sharing`); see `modpo.packing`. Each layout also says which hidden state scores
which response token (`score_positions` / `score_targets` / `score_sequences`), so `logps.sequence_logps`
scores them all the same way. `PreferenceCollator` adds what the loss reads (`PreferenceBatch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import torch

from modpo.conditioning import Conditioner
from modpo.packing import pack, pack_shared_prompt, scored_tokens


def pad(sequences: Sequence[Sequence[int]], value: int, multiple_of: int | None = None) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    if multiple_of:
        width += (-width) % multiple_of
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def to_device(batch: dict, device) -> dict:
    """A collated batch with its tensors on `device` (ints and other values as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def concatenated_inputs(prompt_ids, chosen_ids, rejected_ids, pad_token_id: int, padding_free: bool = False,
                        pad_to_multiple_of: int | None = None, prefix_sharing: bool = False) -> dict:
    """Model inputs scoring all chosen responses (sequences 0..B-1) then all rejected ones (B..2B-1).

    Padded: one right-padded row per sequence. Padding-free: all sequences in one row (`modpo.packing`).
    Prefix sharing: one row in which each prompt appears once (`modpo.packing.pack_shared_prompt`).
    `pad_to_multiple_of` rounds the length up, so compiled kernels see few distinct shapes. Every layout
    also says which hidden state scores which response token (`score_*`, see `modpo.packing.scored_tokens`).
    """
    if prefix_sharing:
        return pack_shared_prompt(prompt_ids, chosen_ids, rejected_ids, pad_token_id, pad_to_multiple_of)
    prompts = list(prompt_ids) * 2
    responses = list(chosen_ids) + list(rejected_ids)
    if padding_free:
        return pack(prompts, responses, pad_token_id, pad_to_multiple_of)
    sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
    input_ids = pad(sequences, pad_token_id, pad_to_multiple_of)
    width = input_ids.shape[1]
    return {
        "input_ids": input_ids,
        "attention_mask": pad([[1] * len(s) for s in sequences], 0, pad_to_multiple_of),
        **scored_tokens([(b * width + len(p) - 1, b * width + len(p), r)
                         for b, (p, r) in enumerate(zip(prompts, responses))]),
    }


class PreferenceBatch(TypedDict, total=False):
    """What the collator gives the trainer. `layout` is what `logps.sequence_logps` scores: the model's inputs
    plus `score_*` (and `sequence_index` for packed rows); the rest is what the loss reads, per pair."""

    layout: dict[str, torch.Tensor]
    ref_chosen_logps: torch.Tensor      # (B,)
    ref_rejected_logps: torch.Tensor    # (B,)
    chosen_margins: torch.Tensor        # (B, K-1), when there are margin objectives
    rejected_margins: torch.Tensor      # (B, K-1)
    loss_weight: torch.Tensor           # (B,), per-row loss weights (the DPO-LW baseline)
    weights: torch.Tensor               # (B, K), each pair's weight vector (weight-conditioned MODPO)
    row_index: torch.Tensor             # (B,), each pair's row in the training data


@dataclass
class PreferenceCollator:
    """Collates tokenized preference rows (plus any precomputed reference log-probs and margins).

    With a `conditioner` (weight-conditioned MODPO, `modpo.conditioning`), each row gets its weight vector and the
    policy sees it as a prefix of the prompt; the reference log-probs were computed without it."""

    pad_token_id: int
    padding_free: bool = False
    pad_to_multiple_of: int | None = None
    prefix_sharing: bool = False
    conditioner: Conditioner | None = None

    def __call__(self, features: list[dict]) -> PreferenceBatch:
        prompts = [f["prompt_ids"] for f in features]
        if self.conditioner is not None:
            weights, prefixes = self.conditioner([f["row_index"] for f in features])
            prompts = [prefix + list(prompt) for prefix, prompt in zip(prefixes, prompts)]
        layout = concatenated_inputs(
            prompts,
            [f["chosen_ids"] for f in features],
            [f["rejected_ids"] for f in features],
            self.pad_token_id,
            self.padding_free,
            self.pad_to_multiple_of,
            self.prefix_sharing,
        )
        batch = PreferenceBatch(layout=layout)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
        for key in ("chosen_margins", "rejected_margins"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32).reshape(len(features), -1)
        if "loss_weight" in features[0]:
            batch["loss_weight"] = torch.tensor([f["loss_weight"] for f in features], dtype=torch.float32)
        if self.conditioner is not None:
            batch["weights"] = torch.tensor(weights, dtype=torch.float32)
        batch["row_index"] = torch.tensor([f.get("row_index", -1) for f in features], dtype=torch.long)
        return batch
