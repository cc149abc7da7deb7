"""The arithmetic of compute-vs-quality curves: a front's hypervolume as a fraction of the optimum's, curves
aggregated over seeds, and the compute a curve needs to reach a threshold.

A curve is a list of budgets in increasing order, each with a compute (x) and a quality (y). Seeds of one
method share the budgets (the same steps, or the same N); they differ in their numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from modpo.front.report import hypervolume


def fraction_of_optimum(values: Sequence[Sequence[float]], optimal: Sequence[Sequence[float]],
                        reference: Sequence[float]) -> float:
    """hypervolume(values) / hypervolume(optimal), both above `reference`: `values` are a front's points (one per
    weight vector), `optimal` the optimum's points at the same weight vectors."""
    best = hypervolume([list(v) for v in optimal], list(reference))
    if best <= 0:
        raise ValueError("the optimal points dominate nothing above the reference point")
    return hypervolume([list(v) for v in values], list(reference)) / best


def compute(tokens: dict) -> int:
    """The FLOP proxy of a token count: forward + 2 x backward (a backward pass costs about two forwards)."""
    return int(tokens["forward"]) + 2 * int(tokens["backward"])


def spread(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def aggregate(curves: Sequence[Sequence[dict]], keys: Sequence[str] = ("compute", "fraction")) -> list[dict]:
    """Curves of several seeds (each a list of budgets with the same length) -> one curve, per budget the spread of
    every key over the seeds."""
    lengths = {len(c) for c in curves}
    if len(lengths) != 1:
        raise ValueError(f"curves of different lengths {sorted(lengths)}: the seeds do not share their budgets")
    return [{k: spread([c[i][k] for c in curves]) for k in keys} for i in range(lengths.pop())]


def compute_to_reach(xs: Sequence[float], ys: Sequence[float], threshold: float) -> float | None:
    """The compute at which the curve (xs increasing, ys at them) first reaches `threshold`, interpolating linearly
    between the two budgets around the first crossing; xs[0] if the first budget already reaches it, None if no
    budget does."""
    if len(xs) != len(ys) or not xs:
        raise ValueError("compute_to_reach: give one y per x, at least one")
    if ys[0] >= threshold:
        return float(xs[0])
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 >= threshold:
            return float(x0 + (threshold - y0) / (y1 - y0) * (x1 - x0))
    return None


def best_index(ys: Sequence[float]) -> int:
    """The budget with the highest quality (the first of equals)."""
    return max(range(len(ys)), key=lambda i: (ys[i], -i))
