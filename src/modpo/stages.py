"""The paper's training stages, each from a StageConfig: SFT, reward model, DPO and MODPO.

SFT and reward models are TRL's trainers; DPO is MODPO with one objective. Every stage ends with a
`save_pretrained` folder, a model card (README.md) and `modpo_run.json`, written last and atomically:
its presence marks a finished run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import platform
import time
from pathlib import Path

import torch

from modpo.cache import stable_hash, write_atomic
from modpo.conditioning import on_grid
from modpo.config import MODPOConfig
from modpo.data.formats import check_sft_rows, tokenize_reward_pairs
from modpo.data.loaders import load_dataset_from_config, load_preferences, read_records
from modpo.errors import ConfigError
from modpo.guard import save_failed
from modpo.margin_scale import card_lines as margin_card_lines
from modpo.margin_specs import margin_sources
from modpo.models import load_model, load_tokenizer, resolve, whole_weights
from modpo.preflight import guarded_stage
from modpo.progress import route_trainer_logs
from modpo.run_config import StageConfig
from modpo.trainer import MODPOTrainer

logger = logging.getLogger(__name__)

RUN_FILE = "modpo_run.json"
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
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".json", ".txt", ".model", ".jinja")
NOT_MODEL_FILES = {RUN_FILE, "evaluation.json", "trainer_state.json"}
HASHED_FILE_BYTES = 256 << 20  # larger files are identified by size and modification time


def _file_stamp(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > HASHED_FILE_BYTES:
        return f"size {stat.st_size}, modified {stat.st_mtime_ns}"
    return _content_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _content_hash(path: str, size: int, modified_ns: int) -> str:
    """SHA-256 of a file, read once per process while its size and modification time stay the same (the points
    of a front read the same data and models)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256 " + digest.hexdigest()


def input_stamp(path: str):
    """What a model or data path holds now: a file's content hash (size and modification time above 256 MiB), a
    folder's model files each so, or None for what is not local (a hub id)."""

    folder, gguf = resolve(path)
    where = Path(folder).expanduser() / gguf if gguf else Path(folder).expanduser()
    if where.is_file():
        return _file_stamp(where)
    if where.is_dir():
        return {f.name: _file_stamp(f) for f in sorted(where.iterdir())
                if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES and f.name not in NOT_MODEL_FILES}
    return None


def stage_inputs(cfg: StageConfig) -> dict:
    """Stamps of every model and data path the stage reads (`input_stamp`), keyed by the path as configured."""
    paths = [cfg.model, cfg.ref_model, cfg.tokenizer]
    for data in (cfg.train_data, cfg.eval_data):
        paths.append(data.get("path") if isinstance(data, dict) else data)
    for margin in cfg.margins:
        if isinstance(margin, dict):
            paths += [margin.get("model"), margin.get("ref_model")]
    return {path: input_stamp(path) for path in dict.fromkeys(paths) if isinstance(path, str) and path}


def run_identity(cfg: StageConfig, stage: str) -> dict:
    """What a finished run is: the stage, its full config and the contents of its inputs. `config_hash` hashes it."""
    inputs = stage_inputs(cfg)
    return {"config_hash": stable_hash({"stage": stage, **dataclasses.asdict(cfg), "inputs": inputs}),
            "inputs": inputs}


def check_output_dir(cfg: StageConfig, stage: str, overwrite: bool, identity: dict) -> bool:
    """True if output_dir already holds this exact finished run (same config, same input contents); refuse one that
    holds a different run, or this config trained on inputs that have changed since, unless `overwrite`."""
    run_file = Path(cfg.output_dir) / RUN_FILE
    if not run_file.exists():
        return False
    try:
        previous = json.loads(run_file.read_text())
    except ValueError:
        if overwrite:
            return False
        raise ConfigError(f"{run_file}: unreadable run record; pass --overwrite to train into {cfg.output_dir} "
                          "again") from None
    if previous.get("config_hash") == identity["config_hash"]:
        return True
    same_config = previous.get("stage") == stage and previous.get("config") == json.loads(json.dumps(dataclasses.asdict(cfg)))
    if same_config and "inputs" not in previous:  # recorded before input contents were: judged by its config alone
        return not overwrite
    if overwrite:
        return False
    if same_config:
        before = previous["inputs"]
        changed = [path for path, stamp in identity["inputs"].items() if before.get(path) != stamp]
        raise ConfigError(f"{cfg.output_dir} holds this {stage} run trained on inputs that have changed since "
                          f"({', '.join(changed) or 'unknown'}); pass --overwrite to train again")
    raise ConfigError(f"{cfg.output_dir} already holds a different {previous.get('stage', '?')} run; "
                      "choose another output_dir or pass --overwrite")


def resume_from(cfg: StageConfig, resume: bool):
    """What `--resume` passes to Trainer.train: the newest *complete* checkpoint in output_dir.

    transformers writes a checkpoint folder in place, trainer_state.json last, so a run killed while saving
    leaves a folder without it, which Trainer.train(resume_from_checkpoint=True) would pick and fail on (or
    resume from half-saved state). Such folders are skipped. With no complete checkpoint, --resume is refused
    (one line, ConfigError).
    """
    if not resume:
        return None
    complete, torn = [], []
    for folder in Path(cfg.output_dir).glob("checkpoint-*"):
        step = folder.name.removeprefix("checkpoint-")
        if not (step.isdigit() and folder.is_dir()):
            continue
        try:
            json.loads((folder / "trainer_state.json").read_text())
            complete.append((int(step), folder))
        except (OSError, ValueError):
            torn.append(folder.name)
    if not complete:
        raise ConfigError(f"--resume: no complete checkpoint in {cfg.output_dir} (checkpoints are written every "
                          "save_steps when save_strategy is 'steps'); run without --resume to start over")
    step, folder = max(complete)
    newer = sorted(name for name in torn if int(name.removeprefix("checkpoint-")) > step)
    if newer:
        logger.warning("skipping incomplete checkpoint(s) %s (killed while saving); resuming from %s",
                       ", ".join(newer), folder.name)
    return str(folder)


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
    for key in ("weights", "beta", "loss_type"):
        if key in extra:
            card.append(f"- {key}: {extra[key]}")
    if cfg.margins:
        card.append(f"- margin sources: {json.dumps(cfg.margins)}")
    elif extra.get("margin_sources"):
        card.append(f"- margin sources: {', '.join(extra['margin_sources'])}")
    if extra.get("margin_scales"):
        card.extend(margin_card_lines(extra["margin_scales"]))
    if extra.get("conditioning"):
        c = extra["conditioning"]
        example = ",".join(f"{w:g}" for w in on_grid([1 / c["num_objectives"]] * c["num_objectives"]))
        card.append(f"- weight-conditioned on {c['num_objectives']} objectives ({c['sampling']} weights in training): "
                    f"the prompt is preceded by `{c['example'].strip()}`; steer it with "
                    f"`modpo generate --model {out} --weights {example} \"your prompt\"`")
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
    trainer.train(resume_from_checkpoint=resume_from(cfg, resume))
    return finish(trainer, cfg, stage, started, identity,
                  {"weights": args.weights, "beta": args.beta, "loss_type": args.loss_type,
                   "token_counts": trainer.token_counts,
                   "margin_sources": [s.describe() for s in sources] or (
                       ["data columns chosen_margins/rejected_margins"] if len(args.weights) > 1 else []),
                   "margin_scales": trainer.margin_scales.record() if trainer.margin_scales is not None else None,
                   "conditioning": trainer.conditioner.record() if trainer.conditioner is not None else None})


STAGES = {"sft": run_sft, "reward": run_reward,
          "dpo": lambda cfg, **kw: run_preference(cfg, "dpo", **kw),
          "train": lambda cfg, **kw: run_preference(cfg, "train", **kw)}

