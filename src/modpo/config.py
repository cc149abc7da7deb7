"""MODPOConfig: transformers.TrainingArguments plus the MODPO settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from modpo.loss import LOSS_TYPES, validate_weights


@dataclass
class MODPOConfig(TrainingArguments):
    """Training arguments for MODPO (and DPO, which is MODPO with `weights=[1.0]`)."""

    weights: list[float] = field(
        default_factory=lambda: [1.0],
        metadata={"help": "Weight per objective, on the simplex (sums to 1). weights[0] belongs to the preference "
                          "pairs, weights[1:] to the margin rewards, in order. [1.0] is plain DPO."},
    )
    beta: float = field(default=0.1, metadata={"help": "KL strength beta (> 0): smaller moves further from the reference."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {LOSS_TYPES}."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Conservative-DPO label smoothing eps in [0, 0.5)."})
    max_length: int = field(default=1024, metadata={"help": "Max tokens of prompt + response; longer responses are "
                                                            "truncated (and counted), prompts that leave no room are refused."})
    append_eos: bool = field(default=True, metadata={"help": "End every response with the tokenizer's eos token, so the "
                                                             "policy learns where to stop."})
    chunked_logps: bool = field(default=True, metadata={"help": "Apply the LM head to response tokens only, in chunks, "
                                                               "without materialising full-vocabulary fp32 logits."})
    padding_free: bool = field(default=False, metadata={"help": "Pack each batch's sequences into one row without pad "
                                                               "tokens (variable-length attention; fastest on GPU)."})
    prefix_sharing: bool = field(default=False, metadata={"help": "Run each pair's prompt once, not twice: pack prompt, "
                                                                 "chosen and rejected in one sequence where the rejected "
                                                                 "response attends to the prompt but not to the chosen "
                                                                 "one (padding-free; same log-probs)."})
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Round batch lengths up to a multiple of "
                                                                         "this (shape buckets for torch_compile)."})
    precompute_batch_size: int = field(default=16, metadata={"help": "Batch size of the reference/margin precompute."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where precomputed reference log-probs and margins are "
                                                                 "cached (default: $MODPO_CACHE or ~/.cache/modpo)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator needs the token columns."})

    def __post_init__(self):
        super().__post_init__()
        self.weights = validate_weights(self.weights)
        if abs(sum(self.weights) - 1.0) > 1e-6:
            raise ValueError(f"weights {self.weights} sum to {sum(self.weights):g}; MODPO weights lie on the simplex "
                             f"(scale is set by beta): use {[round(w / sum(self.weights), 6) for w in self.weights]}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta = {self.beta} must be a finite number > 0")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type = {self.loss_type!r}; expected one of {LOSS_TYPES}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing = {self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing = {self.label_smoothing} applies to loss_type 'sigmoid' only, "
                             f"not {self.loss_type!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length = {self.max_length} must be at least 2")
