"""Loading from a config entry: the registry of named loaders, the split by prompt and the limit."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from datasets import Dataset

from modpo.data.loaders.attribute_ratings import load_attribute_ratings
from modpo.data.loaders.hh_rlhf import load_hh_rlhf
from modpo.data.loaders.preferences import load_preferences
from modpo.data.loaders.pku_saferlhf import load_pku_saferlhf
from modpo.data.loaders.qa_feedback import load_qa_feedback
from modpo.data.loaders.ultrafeedback import load_ultrafeedback
from modpo.errors import ConfigError

LOADERS: dict[str, Callable[..., Dataset]] = {
    "pku_saferlhf": load_pku_saferlhf,
    "hh_rlhf": load_hh_rlhf,
    "ultrafeedback": load_ultrafeedback,
    "qa_feedback": load_qa_feedback,
    "attribute_ratings": load_attribute_ratings,
    "jsonl": load_preferences,
}


def load_dataset_from_config(spec: Mapping[str, Any]) -> Dataset:
    """Load a data set from a config entry: {"loader": name, "path": ..., other loader kwargs}.

    Optional keys: "max_prompt_chars": N keeps the records whose prompt has at most N characters (a conversation:
    all its messages' contents), then "split": {"test_fraction": 0.2, "seed": 0, "part": "train" | "test"} (see
    `split_by_prompt`), then "limit": N keeps the first N records of the result. Records keep their
    `source_row` through all three.
    """
    options = dict(spec)
    name, path = options.pop("loader", None), options.pop("path", None)
    split, limit = options.pop("split", None), options.pop("limit", None)
    max_chars = options.pop("max_prompt_chars", None)
    if name not in LOADERS:
        raise ConfigError(f"data.loader: unknown loader {name!r}; expected one of {sorted(LOADERS)}")
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"data.path: expected a file path for loader {name!r}, got {path!r}")
    loader = LOADERS[name]
    try:
        inspect.signature(loader).bind(path, **options)
    except TypeError as error:
        raise ConfigError(f"data: bad options for loader {name!r}: {error}") from None
    dataset = loader(path, **options)
    if max_chars is not None:
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
            raise ConfigError(f"data.max_prompt_chars: expected a positive integer, got {max_chars!r}")
        dataset = dataset.select([i for i, p in enumerate(dataset["prompt"]) if prompt_chars(p) <= max_chars])
    if split is not None:
        if not isinstance(split, Mapping):
            raise ConfigError(f"data.split: expected a mapping, got {split!r}")
        try:
            inspect.signature(split_by_prompt).bind(dataset, **split)
        except TypeError as error:
            raise ConfigError(f"data.split: {error}") from None
        dataset = split_by_prompt(dataset, **split)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"data.limit: expected a non-negative integer, got {limit!r}")
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def prompt_chars(prompt) -> int:
    """Characters of a prompt: its text, or the contents of all messages of a conversation."""
    if isinstance(prompt, list):
        return sum(len(str(m.get("content", ""))) for m in prompt if isinstance(m, dict))
    return len(str(prompt))


def split_by_prompt(dataset: Dataset, test_fraction: float, seed: int = 0, part: str = "train") -> Dataset:
    """The train or test part of a deterministic split that keeps all pairs of a prompt on one side.

    Distinct prompts are ranked by sha256(seed, prompt); the first round(test_fraction * n) of them (at
    least one) form the test part. The result depends only on the prompts and the seed, not on the
    row order, and keeps the original order of the records.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ConfigError(f"data.split.test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    if part not in ("train", "test"):
        raise ConfigError(f"data.split.part: expected 'train' or 'test', got {part!r}")
    keys = [json.dumps(prompt, sort_keys=True) for prompt in dataset["prompt"]]

    def rank(key: str) -> str:
        return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()

    distinct = sorted(set(keys), key=rank)
    test = set(distinct[: max(1, round(test_fraction * len(distinct)))])
    return dataset.select([i for i, key in enumerate(keys) if (key in test) == (part == "test")])
