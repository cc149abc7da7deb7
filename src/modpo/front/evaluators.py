"""Evaluators score (prompt, response) on every objective of the front.

They must be independent of the margin sources used in training (a held-out reward model, exact rewards,
rules), so that a front measures quality rather than how well training fit its own margins.

A learned evaluator is checked before it is trusted: with `check: {pairs: <held-out preference rows>, floor: 0.6}`
its pairwise accuracy on those pairs is measured before any model is sampled, reported beside the front, and an
evaluator under the floor is marked not usable (`modpo.front.sweep.check_evaluators`).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
from datasets import Dataset

from modpo.errors import ConfigError
from modpo.margin_specs import margin_sources


class Evaluator:
    """Scores a list of {prompt, response}: returns (N, len(objectives)) and the malformed count."""

    objectives: tuple[str, ...] = ()

    def describe(self) -> str:
        return type(self).__name__

    def score(self, samples: list[dict]) -> tuple[torch.Tensor, int]:
        raise NotImplementedError


# Evaluator types a config names by `type`, each a factory of an Evaluator taking the spec's other keys: filled by
# the packages that bring them (`register_evaluator`; e.g. the demo's exact rewards), so this module knows none.
EVALUATOR_TYPES: dict[str, Callable[..., Evaluator]] = {}


def register_evaluator(name: str, factory: Callable[..., Evaluator]) -> None:
    """Make `{type: name, ...}` an evaluator: `factory(**other keys)`."""
    EVALUATOR_TYPES[name] = factory


def imported(target, where: str):
    """The object of an import path 'package.module:attribute' (ConfigError in one line if there is none)."""
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise ConfigError(f"{where}: callable = {target!r}: give 'package.module:attribute'")
    module, attribute = target.split(":")
    try:
        found = importlib.import_module(module)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{where}: cannot import {target}: {err}") from None
    return found


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
        kind, where = spec.get("type"), f"evaluation.evaluators[{i}]"
        if kind in EVALUATOR_TYPES or kind == "evaluator":  # registered, or named by import path
            options = {k: v for k, v in spec.items() if k not in ("type", "callable")}
            factory = EVALUATOR_TYPES.get(kind) or imported(spec.get("callable"), where)
            try:
                evaluators.append(factory(**options))
            except TypeError as err:
                raise ConfigError(f"{where}: {err}") from None
            continue
        names = spec.get("names")
        check = check_spec(spec["check"], f"evaluation.evaluators[{i}]") if "check" in spec else None
        spec = {k: v for k, v in spec.items() if k not in ("names", "check")}
        try:
            (source,) = margin_sources([spec], tokenizer, max_length=spec.pop("max_length", 1024))
        except ConfigError as err:
            hint = (f"; or an evaluator type registered by its package ({', '.join(sorted(EVALUATOR_TYPES)) or 'none'}"
                    " now), or {type: evaluator, callable: 'module:Class'}") if "unknown type" in str(err) else ""
            raise ConfigError(f"evaluation.evaluators[{i}]: {err}{hint}") from None
        evaluators.append(MarginSourceEvaluator(source, tuple(names) if names else None, check))
    if not evaluators:
        raise ConfigError("evaluation.evaluators: give at least one evaluator")
    return evaluators
