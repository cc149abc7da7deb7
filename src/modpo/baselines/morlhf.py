"""MORLHF: on-policy RL on the weighted reward w . r, with a KL penalty to the SFT model.

    max_pi  E_{x, y ~ pi} [ w . r(x, y) ]  -  beta * KL(pi || pi_sft)

is the objective whose optimum MODPO reaches without RL: pi_w ∝ pi_sft * exp(w . r / beta). Here it is
optimised with TRL's RLOOTrainer (REINFORCE with a leave-one-out baseline; `reward_weights` = w over one
reward function per objective, KL as a sequence-level reward penalty with the same beta). The rewards are
the training-side rewards of `baselines.rewards` (the per-objective DPO models' implicit rewards).

`CountingRLOOTrainer` records the compute in tokens (non-pad): generation (prompt + completion tokens),
the old-policy and reference log-prob passes, the reward passes, and the policy's training forward and
backward passes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig

from modpo.cache import stable_hash, write_atomic
from modpo.errors import ConfigError
from modpo.models import load_model, load_tokenizer

RUN_FILE = "modpo_run.json"


@dataclass
class MORLHFSettings:
    """The RL budget and hyperparameters of one MORLHF run (one weight vector)."""

    steps: int = 40                   # optimizer steps
    prompts_per_step: int = 16        # distinct prompts per step
    generations: int = 4              # completions per prompt (RLOO's group)
    learning_rate: float = 1e-3
    beta: float = 0.1                 # KL coefficient: the same beta as MODPO's
    max_completion_length: int = 4
    min_new_tokens: int = 0
    temperature: float = 1.0
    seed: int = 0
    save_fraction: float = 0.0        # > 0: a checkpoint every this fraction of the steps (a budget curve)

    def record(self) -> dict:
        record = dataclasses.asdict(self)
        if not self.save_fraction:  # runs without checkpoints keep the identity they had before the option
            del record["save_fraction"]
        return record


def reward_functions(rewards) -> list:
    """One TRL reward function per objective of `rewards` (an ImplicitRewards); they share one scoring pass."""
    functions = []
    for k, name in enumerate(rewards.objectives):
        def reward(prompts, completions, k=k, **kwargs):
            return rewards.score(prompts, completions)[:, k].tolist()

        reward.__name__ = f"{name}_reward"
        functions.append(reward)
    return functions


def _counting_trainer_class():
    from trl import RLOOTrainer

    class CountingRLOOTrainer(RLOOTrainer):
        """RLOOTrainer that counts the non-pad tokens of every forward and backward pass of the policy."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.token_counts = {"forward": 0, "backward": 0}
            self.token_detail = defaultdict(int)

        def _generate(self, prompts):
            prompt_ids, completion_ids, completions = super()._generate(prompts)
            tokens = sum(len(p) for p in prompt_ids) + sum(len(c) for c in completion_ids)
            self.token_counts["forward"] += tokens
            self.token_detail["generation_forward"] += tokens
            return prompt_ids, completion_ids, completions

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
            tokens = int(attention_mask.sum())
            self.token_counts["forward"] += tokens
            if torch.is_grad_enabled() and model.training:
                self.token_counts["backward"] += tokens
                self.token_detail["train_forward_backward"] += tokens
            else:
                self.token_detail["logprob_forward"] += tokens
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              *args, **kwargs)

    return CountingRLOOTrainer


def rloo_config(output_dir: str, weights, settings: MORLHFSettings):
    from trl import RLOOConfig

    cpu = not torch.cuda.is_available()
    return RLOOConfig(
        output_dir=output_dir, reward_weights=[float(w) for w in weights], beta=settings.beta,
        num_generations=settings.generations, per_device_train_batch_size=settings.prompts_per_step * settings.generations,
        max_completion_length=settings.max_completion_length, temperature=settings.temperature,
        generation_kwargs={"min_new_tokens": settings.min_new_tokens} if settings.min_new_tokens else None,
        learning_rate=settings.learning_rate, lr_scheduler_type="constant", max_steps=settings.steps,
        logging_steps=max(1, settings.steps // 5), report_to=[], disable_tqdm=True,
        save_strategy="steps" if settings.save_fraction else "no", save_steps=settings.save_fraction or 500,
        save_only_model=True,
        seed=settings.seed, bf16=False, gradient_checkpointing=False, use_cpu=cpu, dataloader_num_workers=0,
    )


def train_morlhf(sft: str, rewards, prompts: list, weights, output_dir, settings: MORLHFSettings,
                 overwrite: bool = False, lora: dict | None = None) -> Path:
    """Train (or reuse) the MORLHF policy for `weights`; returns its folder (save_pretrained + modpo_run.json).
    `lora`: peft.LoraConfig fields to train an adapter (the reference is then the base with it disabled).

    The run record holds wall_seconds, device and token_counts {forward, backward} including the reward
    passes, with a per-kind breakdown in token_detail.
    """
    from datasets import Dataset

    out = Path(output_dir)
    identity = {"stage": "morlhf", "sft": str(sft), "sft_run": _run_hash(sft), "weights": [float(w) for w in weights],
                "rewards": rewards.describe(), "settings": settings.record(), "prompts": stable_hash(list(prompts)),
                **({"lora": lora} if lora else {})}
    key = stable_hash(identity)
    record_file = out / RUN_FILE
    if record_file.exists():
        previous = json.loads(record_file.read_text())
        if previous.get("config_hash") == key:
            return out
        if not overwrite:
            raise ConfigError(f"{out} already holds a different morlhf run; choose another folder or overwrite")
    started = time.time()
    tokenizer = load_tokenizer(str(sft))
    tokenizer.padding_side = "left"
    model = load_model(str(sft))
    trainer_cls = _counting_trainer_class()
    reward_before = rewards.forward_tokens
    trainer = trainer_cls(model=model, reward_funcs=reward_functions(rewards), args=rloo_config(str(out), weights, settings),
                          train_dataset=Dataset.from_dict({"prompt": list(prompts)}), processing_class=tokenizer,
                          peft_config=LoraConfig(task_type="CAUSAL_LM", **lora) if lora else None)
    trainer.train()
    trainer.save_model(str(out))
    load_tokenizer(str(sft)).save_pretrained(str(out))
    reward_tokens = rewards.forward_tokens - reward_before
    counts = {"forward": trainer.token_counts["forward"] + reward_tokens, "backward": trainer.token_counts["backward"]}
    record = {**identity, "config_hash": key, "wall_seconds": round(time.time() - started, 2),
              "device": str(trainer.args.device), "token_counts": counts,
              "token_detail": {**trainer.token_detail, "reward_forward": reward_tokens},
              "final_log": trainer.state.log_history[-1] if trainer.state.log_history else {},
              "log_history": trainer.state.log_history}
    write_atomic(record_file, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str)))
    return out


def _run_hash(path) -> str | None:
    run = Path(path) / RUN_FILE
    return json.loads(run.read_text()).get("config_hash") if run.exists() else None
