"""Ground-truth rewards for MORLHF from scorers and rules (`modpo.scorers`, `modpo.margin_specs`):

    r_k(x, y) = scale_k * s_k(x, y)

On a task whose preference labels come from a scorer by Bradley-Terry at temperature tau, scale = 1 / tau puts the
scorer in the labels' own units, the reward MODPO's optimum is stated in. No model runs: `forward_tokens` stays 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from datasets import Dataset

from modpo.margin_specs import margin_sources


class ScorerRewards:
    """(N, K) rewards of K scorers, each times its scale, for lists of prompts and responses."""

    def __init__(self, specs: Mapping[str, dict], scales: Mapping[str, float] | None = None):
        self.objectives = tuple(specs)
        self.sources = margin_sources([dict(s) for s in specs.values()], None, max_length=1024)
        self.scales = {name: float((scales or {}).get(name, 1.0)) for name in self.objectives}
        self.forward_tokens = 0

    def describe(self) -> dict:
        return {"type": "scorers", "scorers": {n: s.identity() for n, s in zip(self.objectives, self.sources)},
                "scales": self.scales}

    def score(self, prompts: Sequence, responses: Sequence) -> torch.Tensor:
        table = Dataset.from_dict({"prompt": list(prompts), "response": list(responses)})
        columns = [self.scales[n] * s.score(table, "response")[:, 0] for n, s in zip(self.objectives, self.sources)]
        return torch.stack(columns, dim=1)
