"""Run configurations as data: YAML files plus `key.path=value` overrides, checked key by key."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from modpo.errors import ConfigError


@dataclass
class StageConfig:
    """One training stage (sft, reward, dpo or train)."""

    model: str = field(metadata={"help": "Starting model: a folder, a hub id, a .gguf file, or pkg:smollm2."})
    output_dir: str = field(metadata={"help": "Folder for checkpoints and the final save_pretrained model."})
    train_data: typing.Any = field(metadata={"help": "Training data: a JSONL/JSON/parquet path, or a loader spec "
                                                     "{loader: pku_saferlhf|hh_rlhf|ultrafeedback|qa_feedback|"
                                                     "attribute_ratings|jsonl, path: ..., ...}."})
    eval_data: typing.Any = field(default=None, metadata={"help": "Evaluation data, same forms as train_data."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path (default: the model's)."})
    ref_model: str | None = field(default=None, metadata={"help": "Reference model, as loaded (default: the starting "
                                                                  "model as it starts training; an adapter folder "
                                                                  "with a lora config is merged first).",
                                                          "stages": ("dpo", "train")})
    margins: list = field(default_factory=list, metadata={
        "help": "Margin reward sources for objectives 1..K-1, in order. Each is {type: implicit_reward, model, "
                "ref_model?, beta, prefix_sharing? (default: training's)} | {type: reward_model, model, outputs?} | "
                "{type: columns, chosen: [...], "
                "rejected: [...]} | {type: length_penalty, version?} | {type: scorer, preset: vader_sentiment | callable: "
                "'module:attr', ...} (`modpo.scorers`). Or give chosen_margins/rejected_margins columns.",
        "stages": ("train",)})
    lora: dict | None = field(default=None, metadata={"help": "LoRA settings (peft.LoraConfig fields: r, lora_alpha, "
                                                              "target_modules, ...); null trains all weights."})
    dtype: str = field(default="fp32", metadata={"help": "Weights dtype when loading: fp32, bf16, fp16 or auto."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the hub (off by default)."})
    num_labels: int = field(default=1, metadata={"help": "Outputs of the reward head; TRL's RewardTrainer trains 1 "
                                                         "(one reward model per objective).", "stages": ("reward",)})
    training: dict = field(default_factory=dict, metadata={
        "help": "Trainer arguments: MODPOConfig fields for dpo/train (weights, beta, loss_type, label_smoothing, "
                "max_length, ...), SFTConfig/RewardConfig fields for sft/reward, plus any TrainingArguments field "
                "(learning_rate, num_train_epochs, per_device_train_batch_size, seed, ...)."})


@dataclass
class FrontConfig:
    """A sweep over weight vectors: one MODPO model per vector, each sampled and scored."""

    train: dict = field(metadata={"help": "The train stage's settings (StageConfig keys); output_dir is set per point."})
    output_dir: str = field(metadata={"help": "Report folder; each point trains into output_dir/points/<name>."})
    weights: list = field(metadata={"help": "Weight vectors, e.g. [[0.1, 0.9], [0.5, 0.5], [0.9, 0.1]]."})
    evaluation: dict = field(default_factory=dict, metadata={"help": "Sampling and scoring settings (keys below)."})
    conditioned: dict = field(default_factory=dict, metadata={"help": "Also train ONE weight-conditioned model "
                                                                      "(training keys, e.g. {weight_sampling: "
                                                                      "dirichlet}) and evaluate it at every weight "
                                                                      "vector; empty: none."})
    conditioned_weights: list = field(default_factory=list, metadata={"help": "The weight vectors to evaluate the "
                                                                              "conditioned model at (default: weights)."})


EVALUATION_HELP = {
    "prompts": "Evaluation prompts: a list, or a data spec (as train_data) with a prompt column.",
    "samples_per_prompt": "Responses sampled per prompt.",
    "max_new_tokens": "Most tokens sampled per response.",
    "min_new_tokens": "Fewest tokens sampled per response (eos is suppressed before).",
    "temperature": "Sampling temperature.",
    "top_p": "Nucleus sampling: keep the smallest set of tokens with this probability.",
    "seed": "Sampling seed.",
    "batch_size": "Responses sampled per batch.",
    "evaluators": "List of {type: demo_exact} | {type: reward_model, model, outputs?} | {type: implicit_reward, model, "
                  "ref_model?, beta} | {type: length_penalty} | {type: scorer, preset | callable, ...}; all but demo_exact may add names: [...] (the "
                  "objectives' names in the report), max_length (default 1024) and check: {pairs: <held-out preference "
                  "rows>, floor: 0.6} (its pairwise accuracy on them, measured before sampling and reported; under "
                  "the floor it is marked not usable).",
    "reference_point": "Hypervolume reference, one number per objective (default: each objective's minimum over "
                       "the points).",
    "extra_models": "Models evaluated beside the points without training, {name: model}, e.g. {base: runs/base}.",
    "kl_reference": "A model (e.g. the starting model) to estimate each point's KL(pi || pi_ref) against from its "
                    "samples; unbiased at temperature 1, top_p 1.",
}


def _type_ok(value, annotation) -> bool:
    if annotation is typing.Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    target = origin or annotation
    if target is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if target is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, target)


def from_dict(cls, data: dict, source: str):
    """Build dataclass `cls` from `data`, refusing unknown keys, missing keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(fields)})")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{source}: key '{key}' should be {hints[key]}, got {type(value).__name__} {value!r}")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
    return cls(**data)


def refuse_duplicate_keys(node, source) -> None:
    """A mapping that gives one key twice (yaml would keep the last silently) is refused with the line of each.
    Works on the composed node tree: nothing is constructed."""
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if (key.tag, key.value) in seen:
                    raise ConfigError(f"{source}, line {key.start_mark.line + 1}: duplicate key {key.value!r} (first "
                                      f"given on line {seen[(key.tag, key.value)] + 1})")
                seen[(key.tag, key.value)] = key.start_mark.line
            refuse_duplicate_keys(value, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            refuse_duplicate_keys(item, source)


def read_yaml(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable (permission denied)") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return data or {}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.path=value")
        path, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': value is not valid YAML") from None
        node = data
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{key}' is not a mapping")
        node[keys[-1]] = value
    return data


# Keys whose string values are paths, at any depth of a config: `~` in them is the user's home folder.
PATH_KEYS = {"model", "output_dir", "train_data", "eval_data", "tokenizer", "ref_model", "path", "cache_dir",
             "logging_dir", "prompts", "deepspeed", "kl_reference"}


def expand_home(value, key: str | None = None):
    """`~/x` as the user's home folder in every path-valued key of a nested config (and extra_models' values)."""
    if isinstance(value, str):
        return os.path.expanduser(value) if key in PATH_KEYS and value.startswith("~") else value
    if isinstance(value, list):
        return [expand_home(v, key if key in PATH_KEYS else None) for v in value]
    if isinstance(value, dict):
        return {k: expand_home(v, "path" if key == "extra_models" else k) for k, v in value.items()}
    return value


def load_config(cls, path: str | None, overrides: list[str]):
    data = read_yaml(path) if path else {}
    apply_overrides(data, overrides)
    return from_dict(cls, expand_home(data), path or "command line")


def describe(cls, command: str | None = None) -> str:
    """One line per key with its help, for --help; keys another stage alone uses are left out of `command`'s."""
    lines = []
    for f in dataclasses.fields(cls):
        if command and command not in f.metadata.get("stages", (command,)):
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = "required" if required else f"default: {f.default if f.default is not dataclasses.MISSING else f.default_factory()!r}"
        lines.append(f"  {f.name:<18} {f.metadata.get('help', '')} ({default})")
    return "\n".join(lines)
