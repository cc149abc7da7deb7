"""The paper's training stages, each from a StageConfig: SFT, reward model, DPO and MODPO.

SFT and reward models are TRL's trainers; DPO is MODPO with one objective. Every stage ends with a
`save_pretrained` folder, a model card (README.md) and `modpo_run.json`, written last and atomically:
its presence marks a finished run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import time
from pathlib import Path

import torch

from modpo.cache import write_atomic
from modpo.conditioning import on_grid
from modpo.config import MODPOConfig
from modpo.data.formats import check_sft_rows, tokenize_reward_pairs
from modpo.data.loaders import load_dataset_from_config, load_preferences, read_records
from modpo.errors import ConfigError
from modpo.guard import save_failed
from modpo.margin_scale import card_lines as margin_card_lines
from modpo.margin_specs import margin_sources
from modpo.models import load_model, load_tokenizer, whole_weights
from modpo.preflight import guarded_stage
from modpo.resolved import card_lines as resolved_card_lines
from modpo.progress import route_trainer_logs
from modpo.run_config import StageConfig
from modpo.run_records import RUN_FILE, check_output_dir, resume_from, run_identity
from modpo.trainer import MODPOTrainer

logger = logging.getLogger(__name__)

CPU_DEFAULTS = {"bf16": False, "gradient_checkpointing": False}  # TRL's defaults crawl on CPU


def load_data(spec, name: str, preferences: bool = True):
    """A Dataset from a path (JSONL/JSON/parquet) or a loader spec dict.

    A path holds preference rows (checked) or, with `preferences=False`, any rows (e.g. SFT's
    prompt/completion or messages).
    """
    from datasets import Dataset

    if spec is None:
        return None, None
    if isinstance(spec, str):
        return (load_preferences(spec) if preferences else Dataset.from_list(read_records(spec))), spec
    if isinstance(spec, dict):
        spec = dict(spec)
        as_chat = spec.pop("as_chat", False)
        data = load_dataset_from_config(spec)
        return (as_chat_messages(data) if as_chat else data), str(spec.get("path", name))
    raise ConfigError(f"{name}: expected a path or a loader mapping, got {type(spec).__name__}")


def as_chat_messages(dataset):
    """Text rows as one-turn chat rows (user prompt, assistant responses), for chat-tuned models."""
    def convert(row):
        out = {}
        for field, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant"), ("completion", "assistant")):
            if isinstance(row.get(field), str):
                out[field] = [{"role": role, "content": row[field]}]
        return out

    return dataset.map(convert, desc="chat format")


def trainer_args(config_cls, cfg: StageConfig, **fixed):
    """The stage's trainer config from `cfg.training`, refusing unknown fields."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(cfg.training) - known)
    if unknown:
        raise ConfigError(f"training: unknown key(s) {', '.join(unknown)} for {config_cls.__name__}")
    values = {"report_to": [], "save_total_limit": 2, "logging_steps": 10}
    if not torch.cuda.is_available():
        values.update(CPU_DEFAULTS)
    values.update({key: _as_field_type(config_cls, key, value) for key, value in cfg.training.items()})
    values.update(fixed, output_dir=cfg.output_dir)
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"training: {err}") from None


def _as_field_type(config_cls, key: str, value):
    """YAML 1.1 reads `1e-3` as text: give numeric fields numbers, with a one-line error if it is not one."""
    field = next(f for f in dataclasses.fields(config_cls) if f.name == key)
    kind = str(field.type)
    if not isinstance(value, str) or not any(t in kind for t in ("float", "int")) or "str" in kind or "list" in kind:
        return value
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"training.{key} = {value!r} is not a number") from None
    return int(number) if "int" in kind and "float" not in kind and number.is_integer() else number


# Files of a model folder that say what the model is (weights, config, tokenizer); not modpo's own records.
def finish(trainer, cfg: StageConfig, stage: str, started: float, identity: dict, extra: dict) -> Path:
    """Save the model, its card and the run record (last, atomically); a failed write keeps the checkpoints and
    says where the last one is (`guard.save_failed`)."""
    try:
        return _finish(trainer, cfg, stage, started, identity, extra)
    except OSError as err:
        raise save_failed(cfg.output_dir, err) from None


def _finish(trainer, cfg: StageConfig, stage: str, started: float, identity: dict, extra: dict) -> Path:
    out = Path(cfg.output_dir)
    merged = getattr(trainer, "start_merged", False)  # a new adapter over a merged adapter folder: save standalone
    if merged:
        trainer.save_merged_model(str(out))
    else:
        trainer.save_model(str(out))  # collective under DeepSpeed/FSDP: every process takes part
    if not trainer.is_world_process_zero():
        return out
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(str(out))
    args = trainer.args
    record = {
        "stage": stage,
        "config_hash": identity["config_hash"],
        "config": dataclasses.asdict(cfg),
        "inputs": identity["inputs"],
        "seed": args.seed,
        "train_data": cfg.train_data,
        "margins": cfg.margins,
        "wall_seconds": round(time.time() - started, 2),
        "device": str(args.device),
        "host": platform.node(),
        "final_log": trainer.state.log_history[-1] if trainer.state.log_history else {},
        "saved": "standalone merged model" if merged else "model",
        **extra,
    }
    card = [f"# {out.name}", "", f"Trained with modpo, stage `{stage}`.", "",
            f"- base model: `{cfg.model}`", f"- data: `{json.dumps(cfg.train_data)}`", f"- seed: {args.seed}"]
    for key in ("weights", "objectives", "beta", "loss_type"):
        if key in extra:
            card.append(f"- {key}: {extra[key]}")
    if cfg.margins:
        card.append(f"- margin sources: {json.dumps(cfg.margins)}")
    elif extra.get("margin_sources"):
        card.append(f"- margin sources: {', '.join(extra['margin_sources'])}")
    if extra.get("margin_scales"):
        card.extend(margin_card_lines(extra["margin_scales"]))
    if extra.get("resolved_settings"):
        card.extend(resolved_card_lines(extra["resolved_settings"]))
    if extra.get("conditioning"):
        c = extra["conditioning"]
        example = ",".join(f"{w:g}" for w in on_grid([1 / c["num_objectives"]] * c["num_objectives"]))
        shown = (f"the prompt is preceded by `{c['example'].strip()}`" if c.get("format", "prefix") == "prefix" else
                 "a learned c(w) is added to every input embedding (weight_embedding.safetensors)")
        drawn = (f"cycling through {c['weight_list']}" if c["sampling"] == "cycle" else
                 f"Dirichlet, concentration {c['concentration']}, w_0 >= {c['min_first_weight']}")
        card.append(f"- weight-conditioned on {c['num_objectives']} objectives ({c['sampling']} weights in training: "
                    f"{drawn}): {shown}; steer it with `modpo generate --model {out} --weights {example} "
                    "\"your prompt\"`")
    if cfg.lora:
        card.append(f"- LoRA: {json.dumps(cfg.lora)}")
    if merged:
        card.append(f"- saved as: a standalone model; the starting adapter `{cfg.model}` was merged into its base "
                    "and the trained LoRA adapter merged on top (loads without peft)")
    write_atomic(out / "README.md", lambda tmp: tmp.write_text("\n".join(card) + "\n"))
    write_atomic(out / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str)))
    return out


def _load(cfg: StageConfig, kind: str = "causal_lm", num_labels: int | None = None):
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = load_model(cfg.model, kind=kind, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                       num_labels=num_labels)
    if kind == "reward" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _lora(cfg: StageConfig, task_type: str):
    if not cfg.lora:
        return None
    from peft import LoraConfig

    try:
        return LoraConfig(task_type=task_type, **cfg.lora)
    except TypeError as err:
        raise ConfigError(f"lora: {err}") from None


@contextlib.contextmanager
def lora_errors(cfg: StageConfig):
    """peft's refusals of the LoRA settings, raised inside TRL's trainers (e.g. target modules the model lacks),
    as one-line errors."""
    try:
        yield
    except ValueError as err:
        if cfg.lora and type(err).__module__.startswith("peft"):
            raise ConfigError(f"lora: {str(err).splitlines()[0]}") from None
        raise


@guarded_stage("sft")
def run_sft(cfg: StageConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Supervised fine-tuning with TRL's SFTTrainer (prompt/completion or messages data)."""
    from trl import SFTConfig, SFTTrainer

    identity = run_identity(cfg, "sft")
    if check_output_dir(cfg, "sft", overwrite, identity):
        return Path(cfg.output_dir)
    started = time.time()
    args = trainer_args(SFTConfig, cfg)
    model, tokenizer = _load(cfg)

    train, train_name = load_data(cfg.train_data, "train_data", preferences=False)
    evaluation, eval_name = load_data(cfg.eval_data, "eval_data", preferences=False)
    check_sft_rows(train, train_name)
    if evaluation is not None:
        check_sft_rows(evaluation, eval_name)
    with lora_errors(cfg):
        trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                             processing_class=tokenizer, peft_config=_lora(cfg, "CAUSAL_LM"))
    route_trainer_logs(trainer)
    trainer.train(resume_from_checkpoint=resume_from(cfg, resume))
    return finish(trainer, cfg, "sft", started, identity, {})


@guarded_stage("reward")
def run_reward(cfg: StageConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Reward-model training with TRL's RewardTrainer (Bradley-Terry on preference pairs)."""
    from trl import RewardConfig, RewardTrainer

    if cfg.num_labels != 1:
        raise ConfigError(f"num_labels = {cfg.num_labels}: TRL's RewardTrainer trains one Bradley-Terry output; train one "
                          "reward model per objective (a multi-output model from elsewhere still works as a margin source)")
    identity = run_identity(cfg, "reward")
    if check_output_dir(cfg, "reward", overwrite, identity):
        return Path(cfg.output_dir)
    started = time.time()
    args = trainer_args(RewardConfig, cfg)
    model, tokenizer = _load(cfg, kind="reward", num_labels=cfg.num_labels)
    train, train_name = load_data(cfg.train_data, "train_data")
    evaluation, eval_name = load_data(cfg.eval_data, "eval_data")
    train = tokenize_reward_pairs(train, tokenizer, args.max_length, train_name)
    if evaluation is not None:
        evaluation = tokenize_reward_pairs(evaluation, tokenizer, args.max_length, eval_name)
    with lora_errors(cfg):
        trainer = RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                                processing_class=tokenizer, peft_config=_lora(cfg, "SEQ_CLS"))
    route_trainer_logs(trainer)
    trainer.train(resume_from_checkpoint=resume_from(cfg, resume))
    return finish(trainer, cfg, "reward", started, identity, {})


def trained_for(args: MODPOConfig) -> dict:
    """What the run record and card say the model is trained for: its weight vector, or, for a weight-conditioned
    model, its number of objectives (there `weights` only fixes K; how w was drawn is in its `conditioning`)."""
    if args.weight_sampling is None:
        return {"weights": args.weights}
    return {"objectives": len(args.weights)}


@guarded_stage()
def run_preference(cfg: StageConfig, stage: str = "train", resume: bool = False, overwrite: bool = False) -> Path:
    """MODPO (`stage="train"`) or DPO (`stage="dpo"`: weights [1.0], no margins)."""

    if stage == "dpo":
        if cfg.margins or cfg.training.get("weights", [1.0]) != [1.0]:
            raise ConfigError("dpo: a DPO run has one objective; use `modpo train` for margins and weights")
    identity = run_identity(cfg, stage)
    if check_output_dir(cfg, stage, overwrite, identity):
        return Path(cfg.output_dir)
    started = time.time()
    args = trainer_args(MODPOConfig, cfg)
    with whole_weights():  # the precompute runs plain forward passes on them, also under ZeRO-3
        model, tokenizer = _load(cfg)
        ref_model = load_model(cfg.ref_model, dtype=cfg.dtype) if cfg.ref_model else None
    sources = margin_sources(cfg.margins, tokenizer, args.max_length, prefix_sharing=args.prefix_sharing,
                             append_eos=args.append_eos)  # margin models load whole by themselves
    train, train_name = load_data(cfg.train_data, "train_data")
    evaluation, eval_name = load_data(cfg.eval_data, "eval_data")
    trainer = MODPOTrainer(model, ref_model=ref_model, args=args, train_dataset=train, eval_dataset=evaluation,
                           processing_class=tokenizer, margin_rewards=sources, peft_config=_lora(cfg, "CAUSAL_LM"),
                           data_names=(train_name, eval_name))
    route_trainer_logs(trainer)
    checkpoint = resume_from(cfg, resume)
    if checkpoint:
        trainer.load_weight_embedding(checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    return finish(trainer, cfg, stage, started, identity,
                  {**trained_for(args), "beta": args.beta, "loss_type": args.loss_type,
                   "token_counts": trainer.token_counts,
                   "resolved_settings": trainer.settings.record(),
                   "margin_sources": [s.describe() for s in sources] or (
                       ["data columns chosen_margins/rejected_margins"] if len(args.weights) > 1 else []),
                   "margin_scales": trainer.margin_scales.record() if trainer.margin_scales is not None else None,
                   "conditioning": trainer.conditioning_record()})


STAGES = {"sft": run_sft, "reward": run_reward,
          "dpo": lambda cfg, **kw: run_preference(cfg, "dpo", **kw),
          "train": lambda cfg, **kw: run_preference(cfg, "train", **kw)}

