"""Evaluators score (prompt, response) on every objective of the front.

They must be independent of the margin sources used in training (a held-out reward model, exact rewards,
rules), so that a front measures quality rather than how well training fit its own margins.

A learned evaluator is checked before it is trusted: with `check: {pairs: <held-out preference rows>, floor: 0.6}`
its pairwise accuracy on those pairs is measured before any model is sampled, reported beside the front, and an
evaluator under the floor is marked not usable (`modpo.front.sweep.check_evaluators`).
"""

from __future__ import annotations

import math

import torch
from datasets import Dataset

from modpo.demo import task
from modpo.errors import ConfigError
from modpo.margin_specs import margin_sources


class Evaluator:
    """Scores a list of {prompt, response}: returns (N, len(objectives)) and the malformed count."""

    objectives: tuple[str, ...] = ()

    def describe(self) -> str:
        return type(self).__name__

    def score(self, samples: list[dict]) -> tuple[torch.Tensor, int]:
        raise NotImplementedError


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


class MarginSourceEvaluator(Evaluator):
    """Any margin source (reward model, implicit reward, rule) used as an evaluator."""

    def __init__(self, source, names: tuple[str, ...] | None = None, check: dict | None = None):
        self.source, self.check = source, check
        self.objectives = names or tuple(f"{source.name}_{k}" if source.num_objectives > 1 else source.name
                                         for k in range(source.num_objectives))

    def describe(self) -> str:
        return self.source.describe()

    def score(self, samples):
        data = Dataset.from_list([{"prompt": s["prompt"], "response": s["response"]} for s in samples])
        return self.source.score(data, "response").double(), 0


def score_samples(evaluators: list[Evaluator], samples: list[dict]) -> tuple[torch.Tensor, int, tuple[str, ...]]:
    """Every evaluator on the same samples: (N, total objectives) scores, malformed count, objective names."""
    columns, malformed, objectives = [], 0, ()
    for evaluator in evaluators:
        scores, bad = evaluator.score(samples)
        columns.append(scores)
        malformed += bad
        objectives += tuple(evaluator.objectives)
    return torch.cat(columns, dim=1), malformed, objectives


DEFAULT_FLOOR = 0.6  # held-out pairwise accuracy below which an evaluator's ranking is not evidence


def pairwise_accuracy(evaluator: "MarginSourceEvaluator", pairs) -> list[dict]:
    """Per objective of the evaluator: the fraction of held-out pairs (prompt, chosen, rejected) it scores chosen
    above rejected (a tie counts one half), with its binomial standard error, and whether it clears the floor."""
    scores = evaluator.source.score_pairs(pairs)
    floor = float(evaluator.check.get("floor", DEFAULT_FLOOR))
    results = []
    for k, objective in enumerate(evaluator.objectives):
        chosen, rejected = scores["chosen"][:, k], scores["rejected"][:, k]
        n = len(chosen)
        accuracy = ((chosen > rejected).double().sum() + 0.5 * (chosen == rejected).double().sum()).item() / n
        results.append({"objective": objective, "evaluator": evaluator.describe(), "pairs": n,
                        "accuracy": accuracy, "stderr": math.sqrt(accuracy * (1 - accuracy) / n), "floor": floor,
                        "usable": accuracy >= floor})
    return results


def check_spec(spec, where: str) -> dict:
    if not isinstance(spec, dict) or "pairs" not in spec or set(spec) - {"pairs", "floor"}:
        raise ConfigError(f"{where}.check: give {{pairs: <held-out preference rows>, floor: {DEFAULT_FLOOR}}}")
    floor = spec.get("floor", DEFAULT_FLOOR)
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
        raise ConfigError(f"{where}.check.floor: an accuracy between 0 and 1, got {floor!r}")
    return spec


def build_evaluators(specs: list[dict], tokenizer=None) -> list[Evaluator]:
    evaluators = []
    for i, spec in enumerate(specs):
        if spec.get("type") == "demo_exact":
            evaluators.append(DemoExactEvaluator())
            continue
        names = spec.get("names")
        check = check_spec(spec["check"], f"evaluation.evaluators[{i}]") if "check" in spec else None
        spec = {k: v for k, v in spec.items() if k not in ("names", "check")}
        try:
            (source,) = margin_sources([spec], tokenizer, max_length=spec.pop("max_length", 1024))
        except ConfigError as err:
            raise ConfigError(f"evaluation.evaluators[{i}]: {err}") from None
        evaluators.append(MarginSourceEvaluator(source, tuple(names) if names else None, check))
    if not evaluators:
        raise ConfigError("evaluation.evaluators: give at least one evaluator")
    return evaluators
