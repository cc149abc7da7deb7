"""MODPOConfig: transformers.TrainingArguments plus the MODPO settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from modpo.conditioning import FORMATS, WeightSampler
from modpo.data.encode import LONG_PROMPTS
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
                                                            "truncated from the right (and counted in one warning)."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Prompts longer than this are long prompts "
                                                                         "(default: only those leaving no room within "
                                                                         "max_length); a truncated prompt keeps this many "
                                                                         "tokens (default max_length // 2)."})
    long_prompts: str = field(default="truncate", metadata={"help": f"What a long prompt does: one of {LONG_PROMPTS}: "
                                                                   "truncate keeps its end (the latest turns), drop "
                                                                   "leaves the row out, refuse stops with an error. "
                                                                   "One warning line counts and names them."})
    append_eos: bool = field(default=True, metadata={"help": "End every text response with the tokenizer's eos token, "
                                                             "so the policy learns where to stop (as TRL). Chat "
                                                             "responses end where the chat template ends the turn."})
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
    weight_sampling: str | None = field(default=None, metadata={"help": "Weight-conditioned MODPO: one policy for "
                                                                       "every w, shown w in its prompt. 'dirichlet' "
                                                                       "draws each row's w per epoch; 'cycle' cycles "
                                                                       "weight_list. `weights` then only fixes K."})
    weight_concentration: float | list[float] = field(default=1.0, metadata={"help": "Dirichlet concentration of "
                                                                                  "weight_sampling: one number > 0 or "
                                                                                  "one per objective."})
    weight_list: list[list[float]] | None = field(default=None, metadata={"help": "The weight vectors "
                                                                               "weight_sampling 'cycle' goes through."})
    conditioning: str = field(default="prefix", metadata={"help": "How a weight-conditioned policy sees w: 'prefix' "
                                                                 "(rendered before the prompt) or 'embedding' (a "
                                                                 "learned c(w) added to every input embedding, zero "
                                                                 "at the start)."})
    equalize_steps: bool = field(default=True, metadata={"help": "Weight-conditioned runs: scale each row's loss by "
                                                                "its w_0, cancelling the 1/w_0 of the logit in its "
                                                                "gradient, so rows of every w move the one shared "
                                                                "model by the same step size (the optimum at each w "
                                                                "is unchanged)."})
    min_first_weight: float = field(default=0.05, metadata={"help": "Smallest w_0 a sampled weight vector gets "
                                                                    "(1/w_0 scales the MODPO logit)."})
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
        if self.weight_sampling is not None:  # checked here, built by the trainer
            WeightSampler(len(self.weights), self.weight_sampling, self.weight_concentration, self.weight_list or [],
                          self.min_first_weight, self.seed)
        if self.conditioning not in FORMATS:
            raise ValueError(f"conditioning = {self.conditioning!r}; expected one of {FORMATS}")
        if self.long_prompts not in LONG_PROMPTS:
            raise ValueError(f"long_prompts = {self.long_prompts!r}; expected one of {LONG_PROMPTS}")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise ValueError(f"max_prompt_length = {self.max_prompt_length} must be at least 1 and below "
                             f"max_length = {self.max_length}")
