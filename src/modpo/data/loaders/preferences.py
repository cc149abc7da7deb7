"""Any preference file (JSONL / JSON / parquet), with an optional mapping of its columns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset

from modpo.data.loaders.files import _read_numbered
from modpo.data.loaders.records import (
    MARGIN_FIELDS,
    STANDARD_FIELDS,
    PathLike,
    Record,
    _check_record,
    _dataset,
    _field,
    _number,
    _refuse_without_preference,
)
from modpo.errors import ConfigError


def load_preferences(path: PathLike, columns: Mapping[str, str | Sequence[str]] | None = None) -> Dataset:
    """Any JSONL / JSON / parquet preference file, with an optional column mapping.

    `columns` maps a record field to a source column (dotted paths reach into nested objects), e.g.
    {"prompt": "question", "chosen": "answer_good", "rejected": "answer_bad",
     "chosen_margins": ["s1_good"], "rejected_margins": ["s1_bad"]}.
    prompt / chosen / rejected default to columns of the same name. A margin maps to one column holding
    a list of numbers, or to a list of columns holding one number each. Any other key adds an extra
    column that must hold a finite number or a boolean. Every mapped column must be in every row.

    Without `columns` the layout comes from all rows, not the first: `chosen_margins` / `rejected_margins`
    are read when any row has them, and then every row must have them. Any other top-level column whose
    values are all numbers (finite) or all booleans is kept, so that it can serve as a margin or for
    analysis; a row that lacks it gets None there.

    Text must be non-empty; margins finite numbers. This is the user's own file, so a pair with an empty
    answer or with chosen identical to rejected is refused (a `DataError` naming it), not dropped.
    """
    rows = _read_numbered(path)
    extras: list[str] = []
    if columns is None:
        mapping: dict[str, Any] = {key: key for key in STANDARD_FIELDS}
        if any(key in raw for _, raw in rows for key in MARGIN_FIELDS):
            mapping.update({key: key for key in MARGIN_FIELDS})
        extras = _number_columns(rows, taken=mapping)
    elif isinstance(columns, Mapping):
        mapping = dict(columns)
    else:
        raise ConfigError(f"load_preferences: columns must be a mapping, got {type(columns).__name__}")
    for key in STANDARD_FIELDS:
        mapping.setdefault(key, key)
    if sum(key in mapping for key in MARGIN_FIELDS) == 1:
        raise ConfigError("load_preferences: give both chosen_margins and rejected_margins, or neither")
    for key, source in mapping.items():
        if not isinstance(source, str) and not (
            key in MARGIN_FIELDS and isinstance(source, Sequence) and all(isinstance(s, str) for s in source)
        ):
            raise ConfigError(f"load_preferences: columns[{key!r}] must be a column name, got {source!r}")
    sources = {key: source for key, source in mapping.items() if isinstance(source, str)}
    records = []
    for row, raw in rows:
        record = _check_record(_mapped_record(raw, mapping, extras, path, row), path, row, sources)
        _refuse_without_preference(record, path, row, sources)
        records.append((row, record))
    return _dataset(records, path)


def _number_columns(rows: list[tuple[int, Record]], taken: Mapping[str, Any]) -> list[str]:
    """Top-level columns, other than `taken`, whose values (where present and not null) are all numbers or
    all booleans, in order of first appearance."""
    kinds: dict[str, set[type]] = {}
    for _, raw in rows:
        for key, value in raw.items():
            if key not in taken and key != "source_row" and value is not None:
                kind = bool if isinstance(value, bool) else float if isinstance(value, (int, float)) else object
                kinds.setdefault(key, set()).add(kind)
    return [key for key, found in kinds.items() if found in ({bool}, {float})]


def _mapped_record(
    raw: Record, mapping: Mapping[str, Any], optional: Sequence[str], file: PathLike, row: int
) -> Record:
    """The record of `mapping`'s columns (each required) and of the `optional` number columns (None if absent)."""
    record: Record = {}
    for key, source in mapping.items():
        if key in MARGIN_FIELDS and not isinstance(source, str):
            record[key] = [_number(_field(raw, column, file, row), file, row, column) for column in source]
            continue
        value = _field(raw, source, file, row)
        if key in STANDARD_FIELDS or key in MARGIN_FIELDS:
            record[key] = value  # checked by _check_record
        else:
            record[key] = _number_or_boolean(value, file, row, source)
    for column in optional:
        value = raw.get(column)
        record[column] = None if value is None else _number_or_boolean(value, file, row, column)
    return record


def _number_or_boolean(value: Any, file: PathLike, row: int, field: str) -> float | bool:
    return value if isinstance(value, bool) else _number(value, file, row, field)
