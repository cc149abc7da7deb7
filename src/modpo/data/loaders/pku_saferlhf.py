"""PKU-SafeRLHF: one pair per prompt, labelled for helpfulness and for harmlessness."""

from __future__ import annotations

from datasets import Dataset

from modpo.data.loaders.files import _read_numbered
from modpo.data.loaders.records import PathLike, Record, _check_record, _dataset, _field
from modpo.errors import ConfigError, DataError

PKU_OBJECTIVES = ("better", "safer")


def load_pku_saferlhf(path: PathLike, objective: str = "better") -> Dataset:
    """PKU-SafeRLHF (PKU-Alignment): two responses per prompt, labelled for helpfulness and for harmlessness.

    Source rows: `prompt`, `response_0`, `response_1`, `better_response_id`, `safer_response_id`,
    `is_response_0_safe`, `is_response_1_safe`. Mapping: chosen = `response_{<objective>_response_id}`,
    rejected = the other response. Both labels are kept over the same pair: `better_is_chosen` and
    `safer_is_chosen` (one of them always True; the other says whether the objectives agree), and
    `is_chosen_safe` / `is_rejected_safe`.
    """
    if objective not in PKU_OBJECTIVES:
        raise ConfigError(f"load_pku_saferlhf: objective must be one of {PKU_OBJECTIVES}, got {objective!r}")
    records = []
    for row, raw in _read_numbered(path):
        ids = {name: _response_id(raw, f"{name}_response_id", path, row) for name in PKU_OBJECTIVES}
        chosen = ids[objective]
        rejected = 1 - chosen
        safe = {i: _boolean(raw, f"is_response_{i}_safe", path, row) for i in (0, 1)}
        record = {
            "prompt": _field(raw, "prompt", path, row),
            "chosen": _field(raw, f"response_{chosen}", path, row),
            "rejected": _field(raw, f"response_{rejected}", path, row),
            "better_is_chosen": ids["better"] == chosen,
            "safer_is_chosen": ids["safer"] == chosen,
            "is_chosen_safe": safe[chosen],
            "is_rejected_safe": safe[rejected],
        }
        records.append((row, _check_record(record, path, row)))
    return _dataset(records, path)


def _response_id(raw: Record, field: str, file: PathLike, row: int) -> int:
    value = _field(raw, field, file, row)
    if isinstance(value, bool) or value not in (0, 1):
        raise DataError(file, row, field, f"expected 0 or 1, got {value!r}")
    return int(value)


def _boolean(raw: Record, field: str, file: PathLike, row: int) -> bool:
    value = _field(raw, field, file, row)
    if not isinstance(value, bool):
        raise DataError(file, row, field, f"expected true or false, got {value!r}")
    return value
