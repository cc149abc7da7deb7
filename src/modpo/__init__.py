"""modpo: Multi-Objective Direct Preference Optimization (Zhou et al., 2023, arXiv 2310.03708).

The loss is `modpo.loss.modpo_loss`; the trainer `modpo.trainer.MODPOTrainer`.
"""

from modpo.config import MODPOConfig
from modpo.loss import modpo_loss, validate_weights
from modpo.margins import (
    CallableMargins,
    ColumnMargins,
    ImplicitRewardMargins,
    MarginSource,
    RewardModelMargins,
    compute_margin_rewards,
    length_penalty,
)
from modpo.scorer_margins import ScorerMargins
from modpo.trainer import MODPOTrainer

__version__ = "0.1.0"

__all__ = [
    "MODPOConfig",
    "MODPOTrainer",
    "modpo_loss",
    "validate_weights",
    "MarginSource",
    "ColumnMargins",
    "CallableMargins",
    "RewardModelMargins",
    "ImplicitRewardMargins",
    "ScorerMargins",
    "compute_margin_rewards",
    "length_penalty",
]
