"""What every loader builds: the standard record, checks of its fields, and the Dataset of records.

A pair with an empty chosen or rejected answer, or with chosen identical to rejected, carries no preference
for DPO-style training (`modpo.data.formats.missing_preference`, the trainer's own rule). The loaders of
public data sets drop such pairs (`_dataset`) and log how many, why, and the first few source rows;
`load_preferences`, which reads the user's own file, refuses the first one with a `DataError` instead
(`_refuse_without_preference`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from datasets import Dataset

from modpo.data.formats import NO_PREFERENCE, missing_preference
from modpo.errors import DataError

logger = logging.getLogger(__package__)  # warnings name the package, `modpo.data.loaders`

Record = dict[str, Any]
Message = dict[str, str]
PathLike = str | os.PathLike

STANDARD_FIELDS = ("prompt", "chosen", "rejected")
MARGIN_FIELDS = ("chosen_margins", "rejected_margins")
ROLES = frozenset({"system", "user", "assistant", "tool"})
_MISSING = object()
ROWS_NAMED_IN_WARNINGS = 5


# ------------------------------------------------------------------------------------ field checks


def _field(record: Mapping[str, Any], path: str, file: PathLike, row: int) -> Any:
    """The value at `path` (a key, or dotted keys into nested objects); DataError when it is missing."""
    value = _lookup(record, path)
    if value is _MISSING:
        raise DataError(file, row, path, "missing column")
    return value


def _lookup(record: Mapping[str, Any], path: str) -> Any:
    if path in record:
        return record[path]
    value: Any = record
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _number(value: Any, file: PathLike, row: int, field: str) -> float:
    """A finite int or float (not a bool) as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(file, row, field, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise DataError(file, row, field, f"expected a finite number, got {value}")
    return float(value)


def _text(value: Any, file: PathLike, row: int, field: str) -> str:
    """A string with some non-whitespace in it."""
    if not isinstance(value, str):
        raise DataError(file, row, field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(file, row, field, "is empty")
    return value


def _messages(value: Any, file: PathLike, row: int, field: str) -> list[Message]:
    """A non-empty list of {"role", "content"} messages, reduced to those two keys."""
    if not isinstance(value, list) or not value:
        raise DataError(file, row, field, "expected a non-empty list of messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise DataError(file, row, f"{field}[{index}]", "expected a {'role', 'content'} object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(file, row, f"{field}[{index}].role", f"expected one of {sorted(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(file, row, f"{field}[{index}].content", "expected a string")
        messages.append({"role": role, "content": content})
    return messages


def _check_record(record: Record, file: PathLike, row: int, sources: Mapping[str, str] | None = None) -> Record:
    """Validate (and normalise messages in) a standard record built by a loader.

    `sources` maps a record field to the file's column it came from, so that errors name the latter.
    The prompt must be non-blank; empty or identical answers are left to `_dataset` (dropped) or to
    `_refuse_without_preference` (refused).
    """
    sources = sources or {}

    def name(key: str) -> str:
        return sources.get(key, key)

    prompt, chosen, rejected = (_field(record, key, file, row) for key in ("prompt", "chosen", "rejected"))
    if isinstance(prompt, list):
        record["prompt"] = _messages(prompt, file, row, name("prompt"))
        for key, answer in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(answer, list):
                raise DataError(file, row, name(key), "the prompt is a message list, so the answer must be too")
            record[key] = _messages(answer, file, row, name(key))
            if record[key][-1]["role"] != "assistant":
                raise DataError(file, row, name(key), "the answer must end with an assistant message")
    else:
        _text(prompt, file, row, name("prompt"))
        for key, answer in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(answer, str):
                kind = type(answer).__name__
                raise DataError(file, row, name(key), f"the prompt is text, so the answer must be text, got {kind}")
    _check_margins(record, file, row, name)
    return record


def _check_margins(record: Record, file: PathLike, row: int, name: Callable[[str], str]) -> None:
    present = [key for key in MARGIN_FIELDS if key in record]
    if not present:
        return
    if len(present) == 1:
        other = "rejected_margins" if present[0] == "chosen_margins" else "chosen_margins"
        raise DataError(file, row, name(other), f"missing column ({name(present[0])} is given)")
    for key in present:
        values = record[key]
        if not isinstance(values, list):
            raise DataError(file, row, name(key), f"expected a list of numbers, got {type(values).__name__}")
        record[key] = [_number(value, file, row, f"{name(key)}[{index}]") for index, value in enumerate(values)]
    if len(record["chosen_margins"]) != len(record["rejected_margins"]):
        raise DataError(file, row, name("rejected_margins"), "must have as many values as chosen_margins")


def _refuse_without_preference(record: Record, file: PathLike, row: int, sources: Mapping[str, str]) -> None:
    problem = missing_preference(record)
    if problem is not None:
        field, reason = problem
        raise DataError(file, row, sources.get(field, field), f"{reason}: {NO_PREFERENCE}")


def _dataset(numbered: list[tuple[int, Record]], file: PathLike) -> Dataset:
    """The (source row, record) pairs as a Dataset with a `source_row` column, less the pairs that carry no
    preference (see the module docstring), which are dropped with one warning."""
    kept, dropped = [], {}
    for row, record in numbered:
        problem = missing_preference(record)
        if problem is None:
            kept.append({**record, "source_row": row})
        else:
            dropped.setdefault(problem, []).append(row)
    if dropped:
        details = "; ".join(f"{field!r} {reason}: {len(rows)} ({_some_rows(rows)})"
                            for (field, reason), rows in dropped.items())
        count = sum(len(rows) for rows in dropped.values())
        logger.warning("%s: dropped %d of %d pairs that carry no preference: %s", file, count, len(numbered), details)
    if not kept:
        raise DataError(file, None, None, "no preference pairs in file")
    return Dataset.from_list(kept)


def _some_rows(rows: list[int]) -> str:
    named = ", ".join(map(str, rows[:ROWS_NAMED_IN_WARNINGS]))
    more = f" and {len(rows) - ROWS_NAMED_IN_WARNINGS} more" if len(rows) > ROWS_NAMED_IN_WARNINGS else ""
    return f"row{'s' if len(rows) > 1 else ''} {named}{more}"


def _warn_skipped(count: int, file: PathLike, why: str) -> None:
    if count:
        logger.warning("%s: skipped %d %s", file, count, why)
