"""The demo task's exact rewards as a front evaluator, registered as `{type: demo_exact}`."""

from __future__ import annotations

import torch

from modpo.demo import task
from modpo.front.evaluators import Evaluator, register_evaluator


class DemoExactEvaluator(Evaluator):
    """The synthetic task's exact rewards (modpo.demo.task)."""

    def __init__(self):
        self.task, self.objectives = task, task.OBJECTIVES

    def describe(self) -> str:
        return "exact rewards of the synthetic demo task"

    def score(self, samples):
        scores, malformed = [], 0
        for s in samples:
            r = self.task.rewards(s["prompt"], s["response"])
            if r is None:
                malformed += 1
                r = (0.0,) * len(self.objectives)
            scores.append(r)
        return torch.tensor(scores, dtype=torch.float64), malformed


register_evaluator("demo_exact", DemoExactEvaluator)
