"""An installed scorer (`modpo.scorers`) as a margin source: r(x, y) = the scorer's value of the response."""

from __future__ import annotations

import torch

from modpo.errors import DataError
from modpo.margins import MarginSource
from modpo.scorers import ScoreError, Scorer, ScorerSpec, package_of


class ScorerMargins(MarginSource):
    """Scores every response with an installed scorer. The cache key holds the providing package's name and
    version, the callable's qualified name and every setting, so a new version of the scorer recomputes."""

    def __init__(self, spec: ScorerSpec, batch_size: int = 256):
        self.spec, self.batch_size = spec, batch_size
        self.name = spec.name
        self.package, self.version = package_of(spec)
        self._scorer = None  # imported on first use: building the source loads nothing

    def describe(self) -> str:
        return f"{self.spec.callable} ({self.package} {self.version})"

    def identity(self) -> dict:
        return {"type": "scorer", **self.spec.record(), "package": self.package, "version": self.version}

    def score(self, dataset, side):
        if self._scorer is None:
            self._scorer = Scorer(self.spec)
        prompts, responses, out = dataset["prompt"], dataset[side], []
        for start in range(0, len(responses), self.batch_size):
            try:
                out += self._scorer.scores(prompts[start : start + self.batch_size],
                                           responses[start : start + self.batch_size])
            except ScoreError as err:
                row = None if err.row is None else start + err.row + 1
                raise DataError("dataset", row, side, err.message) from None
        return torch.tensor(out, dtype=torch.float32).reshape(-1, 1)
