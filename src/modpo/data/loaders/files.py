"""Reading a data file (.jsonl, .jsonl.gz, .json or .parquet) into numbered records.

Row numbers are line numbers for JSONL, 1-based element indices for a JSON list and row indices for
parquet.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from modpo.data.loaders.records import PathLike, Record
from modpo.errors import DataError


def read_records(path: PathLike) -> list[Record]:
    """Read .jsonl, .jsonl.gz, .json (a list of objects) or .parquet into a list of dicts."""
    return [record for _, record in _read_numbered(path)]


def _read_numbered(path: PathLike) -> list[tuple[int, Record]]:
    """(row number, record) pairs of a file; see the module docstring for what the row number counts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "no such file")
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            return _read_jsonl(path)
        if name.endswith(".json"):
            return _read_json_list(path)
        if name.endswith(".parquet"):
            return _read_parquet(path)
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise DataError(path, None, None, f"cannot read file: {error}") from None
    raise DataError(path, None, None, "unsupported file type (expected .jsonl, .jsonl.gz, .json or .parquet)")


def _read_jsonl(path: Path) -> list[tuple[int, Record]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                message = f"malformed JSON: {error.msg} (column {error.colno})"
                raise DataError(path, line_number, None, message) from None
            rows.append((line_number, _as_object(record, path, line_number)))
    return rows


def _read_json_list(path: Path) -> list[tuple[int, Record]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        message = f"malformed JSON: {error.msg} (column {error.colno})"
        raise DataError(path, error.lineno, None, message) from None
    if not isinstance(records, list):
        raise DataError(path, None, None, f"expected a JSON list of objects, got {type(records).__name__}")
    return [(index, _as_object(record, path, index)) for index, record in enumerate(records, start=1)]


def _read_parquet(path: Path) -> list[tuple[int, Record]]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(path, None, None, f"cannot read parquet: {error}") from None
    return list(enumerate(records, start=1))


def _as_object(value: Any, file: Path, row: int) -> Record:
    if not isinstance(value, dict):
        raise DataError(file, row, None, f"expected a JSON object, got {type(value).__name__}")
    return value
