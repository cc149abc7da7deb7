"""Weight-conditioned MODPO: one policy pi(y | x, w) for every weight vector, trained once, steered at inference.

The policy sees w, the reference does not: pi(y | x, w) is trained against the unconditioned pi_ref(y | x), so the
optimum for every w is pi_ref(y|x) exp(w . r(x, y) / beta) and the reference log-probs and margins precomputed once
per row serve every w.

How w is shown, two formats (`FORMATS`), each used identically in training, evaluation and generation:

* `prefix`: tokens before the prompt (`render`), `weights: 0.30 0.70` and a newline, the weights with two decimals
  in objective order. It works for text rows and chat templates alike (the prefix comes before the rendered
  conversation), with and without LoRA.
* `embedding`: a learned vector c(w) added to every input embedding (`modpo.weight_embedding`), zero at the
  start, so the policy starts as the reference for every w.

Weights are put on a two-decimal grid first (`on_grid`: summing to one), so the model is trained for exactly the
weights it is later asked for.

How training draws w (`WeightSampler`): per row and per epoch, seeded by (seed, epoch, row), from a Dirichlet
distribution (`dirichlet`, concentration alpha) or cycling through a fixed list (`cycle`); w_0 is kept at or above
`min_first_weight`, since 1/w_0 scales the logit.

A conditioned model's folder says what steering it needs in `modpo_conditioning.json` (`RECORD_FILE`, written by
`MODPOTrainer.save_model` and `save_merged_model`, so checkpoints, `modpo train` folders and models saved through the
Python API alike carry it): K, the format, the objectives' names where known, and in the `embedding` format the
files of c(w).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modpo.cache import write_atomic
from modpo.loss import validate_weights

DECIMALS = 2
PREFIX = "weights:"
SAMPLINGS = ("dirichlet", "cycle")
FORMATS = ("prefix", "embedding")
RECORD_FILE = "modpo_conditioning.json"


def on_grid(weights: Sequence[float]) -> list[float]:
    """The weights rounded to the rendering's two decimals, still on the simplex (the largest absorbs rounding)."""
    values = [round(float(w), DECIMALS) for w in weights]
    largest = max(range(len(values)), key=lambda k: values[k])
    values[largest] = round(1.0 - sum(v for k, v in enumerate(values) if k != largest), DECIMALS)
    return values


def render(weights: Sequence[float]) -> str:
    """The text that shows w to the policy: `weights: 0.30 0.70` and a newline."""
    return PREFIX + " " + " ".join(f"{w:.{DECIMALS}f}" for w in weights) + "\n"


def vocabulary() -> list[str]:
    """Every word `render` writes, for word-level tokenizers (e.g. the demo's)."""
    return [PREFIX] + [f"{i / 10 ** DECIMALS:.{DECIMALS}f}" for i in range(10 ** DECIMALS + 1)]


def condition_ids(weights: Sequence[float], tokenizer) -> list[int]:
    return tokenizer(render(weights), add_special_tokens=False)["input_ids"]


def check_request(weights: Sequence[float], num_objectives: int) -> list[float]:
    """A weight vector asked of a conditioned model: the right length, w_0 > 0, on the simplex; on the grid."""
    values = validate_weights(list(weights), num_objectives)
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"weights {values} sum to {sum(values):g}; a conditioned model is trained on the simplex: "
                         f"use {[round(w / sum(values), 6) for w in values]}")
    grid = on_grid(values)
    if grid[0] <= 0:
        raise ValueError(f"weights[0] = {values[0]} is below {10 ** -DECIMALS}, the smallest weight the condition shows")
    return grid


@dataclass
class WeightSampler:
    """Per-row weight vectors for one epoch: `weights_for(rows, epoch)`, shape (len(rows), K), on the grid."""

    num_objectives: int
    sampling: str = "dirichlet"
    concentration: float | list[float] = 1.0
    weight_list: list[list[float]] = field(default_factory=list)
    min_first_weight: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"weight_sampling = {self.sampling!r}; expected one of {SAMPLINGS}")
        if self.sampling == "cycle":
            if not self.weight_list:
                raise ValueError("weight_sampling 'cycle' needs weight_list: the weight vectors to cycle through")
            self.weight_list = [check_request(w, self.num_objectives) for w in self.weight_list]
        alpha = self.concentration if isinstance(self.concentration, list) else [self.concentration] * self.num_objectives
        if len(alpha) != self.num_objectives or not all(isinstance(a, (int, float)) and math.isfinite(a) and a > 0
                                                        for a in alpha):
            raise ValueError(f"weight_concentration = {self.concentration!r}: one number > 0, or one per objective")
        self.alpha = [float(a) for a in alpha]
        if not 0 < self.min_first_weight < 1:
            raise ValueError(f"min_first_weight = {self.min_first_weight} must be in (0, 1)")

    def weights_for(self, rows: Sequence[int], epoch: int) -> list[list[float]]:
        out = []
        for row in rows:
            if self.sampling == "cycle":
                out.append(self.weight_list[(row + epoch) % len(self.weight_list)])
                continue
            draw = np.random.default_rng([self.seed, epoch, row]).dirichlet(self.alpha)
            if draw[0] < self.min_first_weight:  # keep 1/w_0 bounded: the rest shares what is left
                rest = draw[1:] * (1 - self.min_first_weight) / max(draw[1:].sum(), 1e-12)
                draw = np.concatenate([[self.min_first_weight], rest])
            out.append(on_grid(draw.tolist()))
        return out


class Conditioner:
    """What the collator adds to a batch of a conditioned run: each row's weights for the current epoch and, in
    the `prefix` format, the token ids that show them (`render`), prepended to its prompt (no ids in the `embedding`
    format: the trainer adds c(w) to the embeddings). The trainer sets `epoch` as each one begins."""

    def __init__(self, sampler: WeightSampler, tokenizer, format: str = "prefix"):
        if format not in FORMATS:
            raise ValueError(f"conditioning = {format!r}; expected one of {FORMATS}")
        self.sampler, self.tokenizer, self.format, self.epoch = sampler, tokenizer, format, 0
        self._ids: dict[tuple, list[int]] = {}

        self.room = self._room()

    def _room(self) -> int:
        """The most tokens a prefix can take: rows are fitted to `max_length` minus this, so a conditioned row never
        exceeds it. A cycled list is measured whole; for Dirichlet draws each position's longest value on the grid
        is added to the rest (a weight's tokens do not depend on its neighbours: they are separated by spaces)."""
        if self.format != "prefix":
            return 0
        k = self.sampler.num_objectives
        if self.sampler.sampling == "cycle":
            return max(len(condition_ids(w, self.tokenizer)) for w in self.sampler.weight_list)
        grid = [i / 10 ** DECIMALS for i in range(10 ** DECIMALS + 1)]
        base = len(condition_ids([0.0] * k, self.tokenizer))
        return base + sum(max(len(condition_ids([0.0] * j + [v] + [0.0] * (k - j - 1), self.tokenizer)) - base
                              for v in grid) for j in range(k))

    def __call__(self, rows: Sequence[int]) -> tuple[list[list[float]], list[list[int]]]:
        weights = self.sampler.weights_for(rows, self.epoch)
        prefixes = []
        for w in weights:
            key = tuple(w)
            if key not in self._ids:
                self._ids[key] = condition_ids(w, self.tokenizer) if self.format == "prefix" else []
                if len(self._ids[key]) > self.room:
                    raise ValueError(f"the weight prefix {render(w)!r} takes {len(self._ids[key])} tokens, more than "
                                     f"the {self.room} its rows were fitted for")
            prefixes.append(self._ids[key])
        return weights, prefixes

    def record(self) -> dict:
        """What a model card and run record say of a conditioned model."""
        sampler = self.sampler
        example = on_grid([1 / sampler.num_objectives] * sampler.num_objectives)
        return {"format": self.format,
                "example": render(example) if self.format == "prefix" else f"c({example}) added to every input embedding",
                "num_objectives": sampler.num_objectives, "sampling": sampler.sampling,
                "concentration": sampler.alpha, "weight_list": sampler.weight_list,
                "min_first_weight": sampler.min_first_weight, "decimals": DECIMALS}


def save_record(record: dict, folder: str | Path) -> None:
    """Write a conditioned model's `RECORD_FILE` into its folder (atomically)."""
    write_atomic(Path(folder) / RECORD_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def read_record(folder: str | Path) -> dict | None:
    """The `RECORD_FILE` of a model folder, None where there is none; ValueError naming the file if unreadable."""
    path = Path(folder) / RECORD_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable conditioning record ({err})") from None
    if not isinstance(record, dict) or record.get("format") not in FORMATS or \
            not isinstance(record.get("num_objectives"), int):
        raise ValueError(f"{path}: a conditioning record needs format (one of {FORMATS}) and num_objectives")
    return record
