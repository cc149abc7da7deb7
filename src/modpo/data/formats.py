"""Preference rows -> token ids, and token ids -> batches.

A preference row is TRL's format: `prompt`, `chosen`, `rejected`, each either text or chat messages
(`[{"role": ..., "content": ...}, ...]`; the prompt holds the conversation so far, chosen/rejected the
assistant turn). Optional columns: `chosen_margins` / `rejected_margins` (K-1 floats each).

`tokenize_preferences` turns rows into `prompt_ids`, `chosen_ids`, `rejected_ids` (response ids only);
`PreferenceCollator` lays out the chosen then the rejected sequences of a batch, so one forward pass scores
both: right-padded rows, or one packed row (`padding_free`, `prefix_sharing`: see `modpo.packing`), plus
`score_positions` / `score_targets` / `score_sequences` saying which hidden state scores which response token.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modpo.errors import DataError

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("prompt", "chosen", "rejected")
NO_PREFERENCE = "the pair carries no preference"


def _check_messages(value, file, row, field) -> None:
    if not value:
        raise DataError(file, row, field, "empty message list")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(file, row, field, f"message {i} must be a dict with 'role' and 'content'")
        if not isinstance(message["role"], str) or not isinstance(message["content"], str):
            raise DataError(file, row, field, f"message {i}: 'role' and 'content' must be text")


def _is_empty(value) -> bool:
    """Blank text, or chat messages whose contents are all blank."""
    if isinstance(value, str):
        return not value.strip()
    return not any(message["content"].strip() for message in value)


def missing_preference(example: dict) -> tuple[str, str] | None:
    """(field, reason) when a well-formed pair gives DPO-style training no preference to learn from: an
    empty chosen or rejected answer, or chosen identical to rejected. None for a usable pair."""
    for field in ("chosen", "rejected"):
        if _is_empty(example[field]):
            return field, "is empty"
    if example["chosen"] == example["rejected"]:
        return "chosen", "identical to 'rejected'"
    return None


def check_preference_row(example: dict, row: int, file: str = "dataset", num_margins: int | None = None) -> None:
    """Raise DataError (file, 1-based row, field) if `example` is not a usable preference row."""
    for field in TEXT_FIELDS:
        if field not in example or example[field] is None:
            raise DataError(file, row, field, f"missing; a preference row needs {', '.join(TEXT_FIELDS)}")
        value = example[field]
        if isinstance(value, str):
            if not value.strip():
                raise DataError(file, row, field, "empty text")
        elif isinstance(value, list):
            _check_messages(value, file, row, field)
        else:
            raise DataError(file, row, field, f"expected text or chat messages, got {type(value).__name__}")
    problem = missing_preference(example)
    if problem is not None:
        field, reason = problem
        raise DataError(file, row, field, f"{reason}: {NO_PREFERENCE}")
    for field in ("chosen_margins", "rejected_margins"):
        if field not in example or example[field] is None:
            continue
        values = example[field]
        if not isinstance(values, (list, tuple)):
            raise DataError(file, row, field, f"expected a list of numbers, got {type(values).__name__}")
        if num_margins is not None and len(values) != num_margins:
            raise DataError(file, row, field, f"has {len(values)} values, expected {num_margins} (one per margin objective)")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise DataError(file, row, field, f"non-numeric value {v!r}")
            if not math.isfinite(v):
                raise DataError(file, row, field, f"non-finite value {v}")


def check_sft_rows(dataset, file: str) -> None:
    """SFT rows are prompt + completion (text or messages), a `messages` conversation, or `text`."""
    if len(dataset) == 0:
        raise DataError(file, None, None, "no rows")
    for index, example in enumerate(dataset):
        row = index + 1
        if example.get("messages") is not None:
            _check_messages(example["messages"], file, row, "messages")
        elif example.get("text") is not None:
            if not isinstance(example["text"], str) or not example["text"].strip():
                raise DataError(file, row, "text", "empty or not text")
        else:
            for field in ("prompt", "completion"):
                value = example.get(field)
                if isinstance(value, list):
                    _check_messages(value, file, row, field)
                elif not isinstance(value, str) or not value.strip():
                    raise DataError(file, row, field, "missing or empty; an SFT row needs prompt + completion, "
                                                      "messages, or text")


def render(prompt, response, tokenizer) -> tuple[str, str]:
    """(prompt text, response text) with the chat template applied when the row is conversational."""
    if isinstance(prompt, str) and isinstance(response, str):
        return prompt, response
    prompt_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    response_messages = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat messages given but the tokenizer has no chat template")
    prompt_text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt_messages + response_messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template does not render the prompt as a prefix of prompt + response")
    return prompt_text, full_text[len(prompt_text):]


@dataclass
class TokenizeStats:
    rows: int = 0
    truncated_responses: int = 0


def tokenize_row(example: dict, tokenizer, max_length: int, row: int, file: str, stats: TokenizeStats,
                 append_eos: bool = True) -> dict:
    """Token ids of one checked row; responses are cut to fit `max_length` (and counted), prompts never."""
    conversational = not isinstance(example["prompt"], str) or not isinstance(example["chosen"], str)
    out = {}
    responses = {}
    for side in ("chosen", "rejected"):
        try:
            prompt_text, response_text = render(example["prompt"], example[side], tokenizer)
        except ValueError as err:
            raise DataError(file, row, side, str(err)) from None
        prompt_ids = tokenizer(prompt_text, add_special_tokens=not conversational)["input_ids"]
        response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
        if append_eos and tokenizer.eos_token_id is not None and (not response_ids or response_ids[-1] != tokenizer.eos_token_id):
            response_ids = response_ids + [tokenizer.eos_token_id]
        out["prompt_ids"] = prompt_ids  # identical for both sides
        responses[side] = response_ids
    for side, ids in responses.items():
        if not ids:
            raise DataError(file, row, side, "tokenizes to no tokens (nothing to score)")
    prompt_ids = out["prompt_ids"]
    if not prompt_ids:
        raise DataError(file, row, "prompt", "tokenizes to no tokens (the first response token could not be scored)")
    if len(prompt_ids) >= max_length:
        raise DataError(file, row, "prompt", f"{len(prompt_ids)} tokens, which leaves no room for a response within max_length={max_length}")
    room = max_length - len(prompt_ids)
    for side, ids in responses.items():
        if len(ids) > room:
            stats.truncated_responses += 1
            ids = ids[:room]
        out[f"{side}_ids"] = ids
    stats.rows += 1
    return out


def tokenize_preferences(dataset, tokenizer, max_length: int, file: str = "dataset", num_margins: int | None = None,
                         append_eos: bool = True):
    """Check every row and add `prompt_ids`, `chosen_ids`, `rejected_ids`, `row_index` columns."""
    stats = TokenizeStats()

    def convert(example, index):
        row = example.get("source_row") or index + 1  # the file's row number when the loader kept it
        check_preference_row(example, row, file, num_margins)
        ids = tokenize_row(example, tokenizer, max_length, row, file, stats, append_eos)
        return {**ids, "row_index": index}

    # In-process map: errors surface as DataError, not as a worker traceback.
    dataset = dataset.map(convert, with_indices=True, desc="tokenizing", load_from_cache_file=False)
    if stats.truncated_responses:
        logger.warning("%s: %d of %d responses were longer than max_length=%d and were truncated",
                       file, stats.truncated_responses, 2 * stats.rows, max_length)
    return dataset


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
    from modpo.packing import pack, pack_shared_prompt, scored_tokens

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


@dataclass
class PreferenceCollator:
    """Collates tokenized preference rows (plus any precomputed reference log-probs and margins)."""

    pad_token_id: int
    padding_free: bool = False
    pad_to_multiple_of: int | None = None
    prefix_sharing: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = concatenated_inputs(
            [f["prompt_ids"] for f in features],
            [f["chosen_ids"] for f in features],
            [f["rejected_ids"] for f in features],
            self.pad_token_id,
            self.padding_free,
            self.pad_to_multiple_of,
            self.prefix_sharing,
        )
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
        for key in ("chosen_margins", "rejected_margins"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32).reshape(len(features), -1)
        if "loss_weight" in features[0]:
            batch["loss_weight"] = torch.tensor([f["loss_weight"] for f in features], dtype=torch.float32)
        batch["row_index"] = torch.tensor([f.get("row_index", -1) for f in features], dtype=torch.long)
        return batch
