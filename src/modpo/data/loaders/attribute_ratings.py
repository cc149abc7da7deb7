"""HelpSteer-style attribute ratings: rated single responses paired by prompt."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

from datasets import Dataset

from modpo.data.loaders.files import _read_numbered
from modpo.data.loaders.records import PathLike, _check_record, _dataset, _field, _number, _text, _warn_skipped
from modpo.errors import ConfigError


class _Rated(NamedTuple):
    row: int
    response: str
    ratings: list[float]


def load_attribute_ratings(
    path: PathLike,
    attributes: Sequence[str],
    prompt_field: str = "prompt",
    response_field: str = "response",
) -> Dataset:
    """HelpSteer / HelpSteer2 style: one row per (prompt, response) with a numeric rating per attribute.

    Mapping: rows are grouped by prompt (in order of first appearance); every two responses to the same
    prompt form a pair, chosen = the higher rating on `attributes[0]` (ties are skipped and logged).
    Columns `score_chosen` / `score_rejected` hold that rating; the ratings on `attributes[1:]`, in that
    order, become `chosen_margins` / `rejected_margins`. A pair's `source_row` is its chosen response's row.
    """
    if isinstance(attributes, str) or not attributes:
        raise ConfigError("load_attribute_ratings: attributes must be a non-empty list of column names")
    groups: dict[str, list[_Rated]] = {}
    for row, raw in _read_numbered(path):
        prompt = _text(_field(raw, prompt_field, path, row), path, row, prompt_field)
        response = _text(_field(raw, response_field, path, row), path, row, response_field)
        ratings = [_number(_field(raw, name, path, row), path, row, name) for name in attributes]
        groups.setdefault(prompt, []).append(_Rated(row, response, ratings))
    records, ties = [], 0
    for prompt, answers in groups.items():
        for first, second in itertools.combinations(answers, 2):
            if first.ratings[0] == second.ratings[0]:
                ties += 1
                continue
            better, worse = (first, second) if first.ratings[0] > second.ratings[0] else (second, first)
            record = {"prompt": prompt, "chosen": better.response, "rejected": worse.response,
                      "score_chosen": better.ratings[0], "score_rejected": worse.ratings[0]}
            if len(attributes) > 1:
                record |= {"chosen_margins": better.ratings[1:], "rejected_margins": worse.ratings[1:]}
            records.append((better.row, _check_record(record, path, better.row)))
    _warn_skipped(ties, path, f"pairs tied on {attributes[0]!r}")
    return _dataset(records, path)
