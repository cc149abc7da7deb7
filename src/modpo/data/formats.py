"""Preference rows: checked, then tokenized by the pair encoder (`modpo.data.encode`) into token-id columns.

A preference row is TRL's format: `prompt`, `chosen`, `rejected`, each either text or chat messages
(`[{"role": ..., "content": ...}, ...]`; the prompt holds the conversation so far, chosen/rejected the
assistant turn). Optional columns: `chosen_margins` / `rejected_margins` (K-1 floats each).

`tokenize_preferences` turns rows into `prompt_ids`, `chosen_ids`, `rejected_ids` (response ids only);
`modpo.batch` lays them out as batches.
"""

from __future__ import annotations

import logging
import math

from modpo.data.encode import FitReport, encode, fit, row_list
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


def check_preference_row(example: dict, row: int | None, file: str = "dataset", num_margins: int | None = None,
                         index: int | None = None) -> None:
    """Raise DataError (file, 1-based row or dataset index, field) if `example` is not a usable preference row."""
    try:
        _check_preference_row(example, row, file, num_margins)
    except DataError as err:
        if index is None:
            raise
        raise DataError(file, None, err.field, err.message, index=index) from None


def _check_preference_row(example: dict, row: int | None, file: str, num_margins: int | None) -> None:
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


def tokenize_row(example: dict, tokenizer, max_length: int, row, file: str, report: FitReport,
                 append_eos: bool = True, long_prompts: str = "truncate", max_prompt_length: int | None = None,
                 index: int | None = None, reserved: int = 0) -> dict | None:
    """Token ids of one checked row (`modpo.data.encode`), fitted to `max_length`; None when the row is dropped.

    `row` is the file's 1-based line, or None with `index` for an in-memory dataset (named `file[index]`)."""
    try:
        prompt_ids, (chosen_ids, rejected_ids) = encode(example["prompt"], [example["chosen"], example["rejected"]],
                                                        tokenizer, append_eos)
    except ValueError as err:
        raise DataError(file, row, "chosen", str(err), index=index) from None
    for side, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        if not ids:
            raise DataError(file, row, side, "tokenizes to no tokens (nothing to score)", index=index)
    if not prompt_ids:
        raise DataError(file, row, "prompt", "tokenizes to no tokens (the first response token could not be scored)",
                        index=index)
    try:
        fitted = fit(prompt_ids, [chosen_ids, rejected_ids], max_length, long_prompts, max_prompt_length, reserved)
    except ValueError as err:
        raise DataError(file, row, "prompt", str(err), index=index) from None
    report.add(fitted, row if row is not None else index, responses=2)
    if fitted is None:
        return None
    return {"prompt_ids": fitted.prompt_ids, "chosen_ids": fitted.response_ids[0], "rejected_ids": fitted.response_ids[1]}


def tokenize_preferences(dataset, tokenizer, max_length: int, file: str = "dataset", num_margins: int | None = None,
                         append_eos: bool = True, long_prompts: str = "truncate", max_prompt_length: int | None = None,
                         reserved: int = 0):
    """Check every row and add `prompt_ids`, `chosen_ids`, `rejected_ids`, `row_index` columns, each row fitted to
    `max_length` less `reserved` tokens (the weight prefix of a conditioned run, added by the collator).

    Rows from a file name its 1-based line (the loaders keep it as `source_row`); rows of an in-memory dataset
    are named as Python indexes them, `file[index]`. Rows whose long prompt is dropped leave the dataset, and one
    warning line says how many prompts were cut or dropped, and which."""
    if len(dataset) == 0:
        raise DataError(file, None, None, "no rows")
    report = FitReport()

    def convert(example, index):
        row = example.get("source_row")  # the file's row number when the loader kept it
        position = None if row else index  # in-memory rows are named dataset[index]
        check_preference_row(example, row, file, num_margins, index=position)
        ids = tokenize_row(example, tokenizer, max_length, row, file, report, append_eos, long_prompts,
                           max_prompt_length, index=position, reserved=reserved)
        keep = ids is not None
        ids = ids or {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
        return {**ids, "row_index": index, "_keep": keep}

    # In-process map: errors surface as DataError, not as a worker traceback.
    dataset = dataset.map(convert, with_indices=True, desc="tokenizing", load_from_cache_file=False)
    if report.dropped:
        dataset = dataset.filter(lambda keep: keep, input_columns="_keep", load_from_cache_file=False)
        if len(dataset) == 0:
            raise DataError(file, None, "prompt", f"every row was dropped: each prompt is too long for "
                                                  f"max_length={max_length}")
    report.warn(file, max_length, "rows" if "source_row" in dataset.column_names else "indexes")
    return dataset.remove_columns("_keep")


def tokenize_reward_pairs(dataset, tokenizer, max_length: int | None, file: str = "dataset"):
    """Check every row and add `chosen_ids` / `rejected_ids`: the ids a reward model is trained on and later scores
    (`modpo.data.encode.sequence_ids`: prompt + response, the last `max_length` kept), as TRL's RewardTrainer takes
    pre-tokenized pairs. No row is left out (TRL would silently drop pairs longer than `max_length`); one warning
    line says how many rows lost the start of a sequence, and which."""
    if len(dataset) == 0:
        raise DataError(file, None, None, "no rows")
    cut = []

    def convert(example, index):
        row = example.get("source_row")
        position = None if row else index  # in-memory rows are named dataset[index]
        check_preference_row(example, row, file, index=position)
        out, long = {}, False
        for side in ("chosen", "rejected"):
            try:  # the ids of `encode.sequence_ids`, cut below
                prompt_ids, (response_ids,) = encode(example["prompt"], [example[side]], tokenizer, append_eos=True)
            except ValueError as err:
                raise DataError(file, row, side, str(err), index=position) from None
            if not response_ids:
                raise DataError(file, row, side, "tokenizes to no tokens (nothing to score)", index=position)
            ids = prompt_ids + response_ids
            long |= max_length is not None and len(ids) > max_length
            out[f"{side}_ids"] = ids[-max_length:] if max_length else ids  # = encode.sequence_ids
        if long:
            cut.append(row or index)
        return out

    dataset = dataset.map(convert, with_indices=True, desc="tokenizing", load_from_cache_file=False)
    if cut:
        logger.warning("%s: %d of %d rows were longer than max_length=%d and keep their end, as the reward model is "
                       "scored (%s %s)", file, len(cut), len(dataset), max_length,
                       "rows" if "source_row" in dataset.column_names else "indexes", row_list(cut))
    return dataset
