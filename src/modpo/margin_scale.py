"""Margins on a scale that a weight can mean: measure each margin objective, warn, normalise on request.

MODPO's optimum is pi_ref(y|x) exp((w_0 r_0 + sum_k w_k r_k) / beta), where r_0 is the preference objective's
Bradley-Terry reward: its differences between two responses are O(1) logits. So w only balances objectives whose
margin differences dm_k = r_k(y_w) - r_k(y_l) are O(1) too. An implicit reward trained with the same beta is;
a raw token count or a reward model's logit need not be.

* Measure: `difference_statistics` gives, per margin objective, the distribution of dm_k over the training pairs.
* Warn: `weight_warnings` names every objective whose weighted difference |w_k dm_k| typically dwarfs (> 10 x)
  or vanishes against (< 0.01 x) the preference objective's w_0 x O(1), and says what to set instead.
* Normalise: a source's `scale` is `none` (the math as written), a number c (r_k -> c r_k), `standardize`
  (r_k -> r_k / sigma_k, sigma_k = std of dm_k over the training pairs), or `robust` (r_k divided by the median
  of |dm_k|, which one outlying pair does not inflate as it does the std). The optimum is then
  pi_ref exp((w_0 r_0 + sum_k w_k c_k r_k) / beta) with c_k the factor in `MarginScales.factors`; the run
  record keeps them, so a front's weights say what they mean. Evaluation scores stay raw.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

SCALES = ("none", "standardize", "robust")
DWARFS, VANISHES = 10.0, 0.01  # |w_k dm_k| / w_0, typical (median) value


def check_scale(scale) -> str | float:
    """'none', 'standardize' or a finite positive number; ValueError otherwise."""
    if isinstance(scale, str) and scale in SCALES:
        return scale
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0:
        return float(scale)
    raise ValueError(f"scale = {scale!r}: expected 'none', 'standardize', 'robust' or a finite number > 0")


def difference_statistics(chosen: torch.Tensor, rejected: torch.Tensor) -> list[dict]:
    """Per objective (column), the distribution of chosen - rejected over the pairs (rows)."""
    differences = (chosen.double() - rejected.double())
    out = []
    for column in differences.T:
        q = torch.quantile(column, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)).tolist()
        out.append({"pairs": column.numel(), "mean": column.mean().item(),
                    "std": column.std(unbiased=False).item() if column.numel() > 1 else 0.0,
                    "min": column.min().item(), "q05": q[0], "q25": q[1], "median": q[2], "q75": q[3], "q95": q[4],
                    "max": column.max().item(), "median_abs": torch.quantile(column.abs(), 0.5).item()})
    return out


@dataclass
class MarginScales:
    """What the precompute measured on the training pairs and the factor applied to each margin objective."""

    names: list[str]
    scales: list[str | float]          # as asked for, per objective
    factors: list[float]               # margin_k -> factor_k * margin_k in training
    raw: list[dict]                    # difference statistics before scaling
    scaled: list[dict] = field(default_factory=list)
    bradley_terry: list[bool] = field(default_factory=list)  # margins on the BT-logit scale by construction

    def record(self) -> dict:
        return asdict(self)


def card_lines(record: dict) -> list[str]:
    """Model-card lines of a `MarginScales.record()`."""
    return [f"- margin objective {k + 1} ({name}): scale {scale}, factor {factor:.4g}; m(y_w) - m(y_l) over the "
            f"training pairs: median {raw['median']:.4g}, std {raw['std']:.4g}, 5-95% [{raw['q05']:.4g}, {raw['q95']:.4g}]"
            for k, (name, scale, factor, raw) in enumerate(zip(record["names"], record["scales"], record["factors"],
                                                                record["raw"]))]


def scale_factors(scales: list[str | float], raw: list[dict]) -> list[float]:
    factors = []
    for scale, stats in zip(scales, raw):
        if scale == "standardize":
            if not stats["std"] > 0:
                raise ValueError("scale standardize: the margin differences over the training pairs have zero "
                                 "spread (every pair ties); there is no scale to divide by")
            factors.append(1.0 / stats["std"])
        elif scale == "robust":
            if not stats["median_abs"] > 0:
                raise ValueError("scale robust: at least half of the training pairs tie on this margin (median "
                                 "|m(y_w) - m(y_l)| is 0); there is no scale to divide by")
            factors.append(1.0 / stats["median_abs"])
        else:
            factors.append(1.0 if scale == "none" else float(scale))
    return factors


def measure(chosen: torch.Tensor, rejected: torch.Tensor, names: list[str], scales: list[str | float],
            factors: list[float] | None = None, bradley_terry: list[bool] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, MarginScales]:
    """Scaled (chosen, rejected) margins and what was measured. `factors` given (e.g. the training data's, for
    evaluation data) are applied as they are; otherwise they follow `scales` on these pairs."""
    raw = difference_statistics(chosen, rejected)
    factors = factors if factors is not None else scale_factors(scales, raw)
    f = torch.tensor(factors, dtype=chosen.dtype)
    chosen, rejected = chosen * f, rejected * f
    return chosen, rejected, MarginScales(names, list(scales), list(factors), raw, difference_statistics(chosen, rejected),
                                          list(bradley_terry or [False] * len(names)))


def weight_warnings(weights: list[float], scales: MarginScales) -> list[str]:
    """One line per margin objective whose weighted difference typically dwarfs or vanishes against the preference
    objective (whose BT reward differences are O(1) logits, weighted by w_0). A margin on the BT-logit scale by
    construction (an implicit reward, scale none) is not said to dwarf it: sharp preference labels make the
    preference objective's own differences large too, and the weight then means what it says."""
    lines = []
    w0 = weights[0]
    for k, (name, stats) in enumerate(zip(scales.names, scales.scaled)):
        wk = weights[k + 1]
        typical = abs(wk) * stats["median_abs"]
        if wk == 0:
            continue
        ratio = typical / w0
        if ratio > DWARFS and not (scales.bradley_terry[k] and scales.scales[k] == "none"):
            effect = (f"it decides nearly every pair and the preference pairs have little say: "
                      f"'{w0:g} preference, {wk:g} {name}' trains on {name} alone")
        elif ratio < VANISHES:
            effect = "it has almost no effect: the run is close to plain DPO on the preference pairs"
        else:
            continue
        balance = 1.0 / stats["median_abs"] if stats["median_abs"] > 0 else float("nan")
        lines.append(f"margin objective {k + 1} ({name}): median |w_{k + 1} * (m(y_w) - m(y_l))| = {typical:.3g} "
                     f"against the preference objective's w_0 * O(1) = {w0:g}: {effect}. Put it on the preference "
                     f"scale with `scale: standardize` on its source (or `scale: {balance:.3g}`, which makes its "
                     f"typical difference 1), then choose weights")
    return lines
