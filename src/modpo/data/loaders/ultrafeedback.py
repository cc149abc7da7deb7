"""UltraFeedback binarized: one rated chosen and rejected answer per prompt."""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from modpo.data.loaders.files import _read_numbered
from modpo.data.loaders.records import (
    _MISSING,
    Message,
    PathLike,
    _check_record,
    _dataset,
    _field,
    _lookup,
    _messages,
    _number,
    _text,
)
from modpo.errors import DataError


def load_ultrafeedback(path: PathLike) -> Dataset:
    """UltraFeedback binarized (HuggingFaceH4 / trl-lib): one chosen and one rejected answer per prompt.

    Source rows: `prompt`, `chosen`, `rejected`, and the GPT-4 ratings `metadata.score_chosen` /
    `metadata.score_rejected` (or top-level `score_chosen` / `score_rejected`). Mapping: text is kept
    as is; the ratings become columns `score_chosen` / `score_rejected` (ties are kept). When chosen /
    rejected are whole conversations (message lists), the prompt becomes the messages before the last
    assistant message, which must be the same in both. The few pairs in the source with an empty answer
    or with chosen identical to rejected are dropped (logged).
    """
    records = []
    for row, raw in _read_numbered(path):
        prompt = _field(raw, "prompt", path, row)
        chosen, rejected = _field(raw, "chosen", path, row), _field(raw, "rejected", path, row)
        if isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen, rejected = _split_conversations(prompt, chosen, rejected, path, row)
        record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        for key in ("score_chosen", "score_rejected"):
            field = key if _lookup(raw, key) is not _MISSING else f"metadata.{key}"
            record[key] = _number(_field(raw, field, path, row), path, row, field)
        records.append((row, _check_record(record, path, row)))
    return _dataset(records, path)


def _split_conversations(
    prompt: Any, chosen: list[Any], rejected: list[Any], file: PathLike, row: int
) -> tuple[list[Message], list[Message], list[Message]]:
    """Whole conversations -> (shared conversation before the answer, [chosen answer], [rejected answer])."""
    chosen, rejected = _messages(chosen, file, row, "chosen"), _messages(rejected, file, row, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(file, row, "rejected", "the conversation before the answer differs from chosen's")
    context = chosen[:-1] or [{"role": "user", "content": _text(prompt, file, row, "prompt")}]
    return context, chosen[-1:], rejected[-1:]
