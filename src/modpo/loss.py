"""The MODPO loss (Zhou et al., 2023, "Beyond One-Preference-Fits-All Alignment", arXiv 2310.03708).

Objective 0 is given as preference pairs (x, y_w, y_l); objectives 1..K-1 as margin rewards r_k(x, y).
For a weight vector w with w_0 > 0 the MODPO logit is

    z = (1 / w_0) * [ beta * ( log pi/pi_ref (y_w|x) - log pi/pi_ref (y_l|x) )
                      - w_{1:} . ( r_{1:}(x, y_w) - r_{1:}(x, y_l) ) ]

and the loss is the DPO loss on z:

    sigmoid:  -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)      (eps = label smoothing)
    hinge:    relu(1 - z)

Its minimiser is the multi-objective RLHF optimum pi_w(y|x) ∝ pi_ref(y|x) exp(w . r(x, y) / beta).
With w = (1, 0, ..., 0) the loss is exactly DPO.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge")


def validate_weights(weights: Sequence[float] | torch.Tensor, num_objectives: int | None = None) -> list[float]:
    """Return `weights` as a list of floats, or raise ValueError saying what is wrong with them."""
    if isinstance(weights, torch.Tensor):
        raw = weights.tolist()
    elif isinstance(weights, (list, tuple)):
        raw = list(weights)
    else:
        raise ValueError(f"weights = {weights!r}: expected a list with one number per objective, e.g. [0.3, 0.7]")
    values = []
    for k, w in enumerate(raw):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ValueError(f"weights[{k}] = {w!r} is not a number")
        values.append(float(w))
    if len(values) == 0:
        raise ValueError("weights is empty: give one weight per objective, weights[0] for the preference pairs")
    if num_objectives is not None and len(values) != num_objectives:
        raise ValueError(
            f"weights has {len(values)} entries but there are {num_objectives} objectives "
            f"(1 preference objective + {num_objectives - 1} margin rewards)"
        )
    for k, w in enumerate(values):
        if not math.isfinite(w):
            raise ValueError(f"weights[{k}] = {w} is not finite")
        if w < 0:
            raise ValueError(f"weights[{k}] = {w} is negative")
    if values[0] <= 0:
        raise ValueError(f"weights[0] = {values[0]} must be > 0: it divides the MODPO logit")
    return values


def modpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_margins: torch.Tensor | None,
    rejected_margins: torch.Tensor | None,
    weights: Sequence[float] | torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MODPO loss per pair.

    Args:
        policy_*_logps, ref_*_logps: summed response log-probs, shape (B,).
        chosen_margins, rejected_margins: margin rewards r_1..r_{K-1} of each response, shape (B, K-1);
            None (or K-1 = 0) for plain DPO.
        weights: length K, weights[0] belonging to the objective of the preference pairs; or a (B, K) tensor, one
            weight vector per pair (weight-conditioned MODPO), each checked by the same rules unless `validate`
            is False (the caller checked them, e.g. `conditioning.WeightSampler`; saves a device sync).
        beta: KL strength. label_smoothing: eps of conservative DPO. loss_type: "sigmoid" or "hinge".

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,). The rewards are the implicit rewards
        beta * log(pi/pi_ref), detached, as DPO reports them.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type = {loss_type!r}; expected one of {LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta = {beta} must be > 0")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing = {label_smoothing} must be in [0, 0.5)")
    batch = policy_chosen_logps.shape[0]
    if (chosen_margins is None) != (rejected_margins is None):
        raise ValueError("give both chosen_margins and rejected_margins, or neither")
    if chosen_margins is None:
        chosen_margins = policy_chosen_logps.new_zeros(batch, 0)
        rejected_margins = policy_chosen_logps.new_zeros(batch, 0)
    if chosen_margins.dim() != 2 or chosen_margins.shape != rejected_margins.shape or chosen_margins.shape[0] != batch:
        raise ValueError(
            f"chosen_margins {tuple(chosen_margins.shape)} and rejected_margins {tuple(rejected_margins.shape)} "
            f"must both have shape (batch={batch}, K-1)"
        )
    num_objectives = chosen_margins.shape[1] + 1
    # Log-sigmoid in fp32 (or better) even when the model runs in bf16.
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    device = policy_chosen_logps.device
    if isinstance(weights, torch.Tensor) and weights.dim() == 2:  # one weight vector per pair
        if weights.shape != (batch, num_objectives):
            raise ValueError(f"per-pair weights have shape {tuple(weights.shape)}, expected (batch={batch}, "
                             f"K={num_objectives})")
        if validate:
            for i, row in enumerate(weights.tolist()):
                try:
                    validate_weights(row, num_objectives)
                except ValueError as err:
                    raise ValueError(f"pair {i}: {err}") from None
        w = weights.to(device=device, dtype=dtype)
        first, margin_weights = w[:, 0], w[:, 1:]
    else:
        values = validate_weights(weights, num_objectives)
        first = values[0]
        margin_weights = torch.tensor(values[1:], dtype=dtype, device=device).expand(batch, -1)
    chosen_logratios = policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype)
    rejected_logratios = policy_rejected_logps.to(dtype) - ref_rejected_logps.to(dtype)
    weighted_margin = ((chosen_margins.to(dtype) - rejected_margins.to(dtype)) * margin_weights).sum(-1)

    z = (beta * (chosen_logratios - rejected_logratios) - weighted_margin) / first
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    else:
        losses = torch.relu(1 - z)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
