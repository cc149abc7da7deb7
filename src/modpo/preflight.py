"""Checks every stage command runs before any model loads, so a bad run is refused in seconds, in one line.

`preflight(cfg, stage, overwrite)` looks at the settings (numbers in range, training that trains at least one
step), the input paths (they exist and can be read), the output folder (not someone else's, writable, with free
space), the model folders (a config.json, safetensors whose headers read, the head the stage needs: a causal LM
for log-probs, a score head for rewards; a tokenizer vocabulary the model's embedding covers) and the data files
(one row format, text or chat, throughout). It reads configs, safetensors headers and tokenizer.json only: no
weights load. `check_evaluation` does the same for `modpo front`'s evaluation settings.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from safetensors import safe_open

from modpo.data.loaders import load_preferences
from modpo.data.loaders.files import _read_numbered
from modpo.errors import ConfigError, DataError
from modpo.guard import check_output_folder, check_writable, output_lock
from modpo.models import resolve
from modpo.run_config import FrontConfig, StageConfig
from modpo.settings_check import check_evaluation_settings, check_margin_settings, check_training_settings

LOGP_STAGES = ("sft", "dpo", "train")  # stages whose model must be a causal LM (reward adds its own head)
ROW_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")


def _local_folder(path: str) -> Path | None:
    """The folder a model path names when it is a local folder (not a hub id, not a GGUF file), else None."""
    folder, gguf = resolve(path)
    where = Path(folder).expanduser()
    if gguf:
        if not (where / gguf).is_file():
            raise ConfigError(f"model path {path} does not exist")
        return None
    if where.exists():
        return where if where.is_dir() else None
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ConfigError(f"model path {path} does not exist")
    return None  # a hub id: transformers finds it (or says why not)


def _readable(path: Path, what: str) -> None:
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path} is not readable (permission denied)")


def _config(folder: Path, path: str) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise ConfigError(f"cannot load a model from {path}: the folder holds no config.json")
    _readable(file, "model config")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot load a model from {path}: config.json is not valid JSON ({err})") from None
    return config if isinstance(config, dict) else {}


def weight_keys(folder: Path, path: str) -> set[str]:
    """Tensor names of the folder's safetensors weights, each file's header read (no tensor is)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as err:
            raise ConfigError(f"cannot load a model from {path}: unreadable model.safetensors.index.json ({err})") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"cannot load a model from {path}: Error no file named model.safetensors found in directory "
                          f"{folder} (modpo loads safetensors weights only)")
    keys: set[str] = set()
    for name in files:
        file = folder / name
        if not file.is_file():
            raise ConfigError(f"cannot load a model from {path}: {name} is missing (listed in the weight index)")
        _readable(file, "weights file")
        try:
            with safe_open(str(file), framework="pt") as f:
                keys.update(f.keys())
        except Exception as err:  # a torn or foreign file: safetensors says why in its own words
            raise ConfigError(f"cannot load a model from {path}: {name} is not a readable safetensors file "
                              f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    return keys


def tokenizer_size(folder: Path) -> int | None:
    """1 + the largest token id of the folder's tokenizer.json (vocabulary and added tokens), or None."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError):
        return None  # transformers reports it when it loads the tokenizer
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t.get("id", -1) for t in data.get("added_tokens") or []]
    ids = [i for i in ids if isinstance(i, int)]
    return max(ids) + 1 if ids else None


def check_model(path: str, where: str, head: str | None, tokens: int | None = None,
                trust_remote_code: bool = False) -> dict | None:
    """Check a local model folder; returns its config (None for a hub id, GGUF or adapter folder).

    `head`: "causal_lm" (log-probs), "score" (a trained classification head) or None."""
    folder = _local_folder(path)
    if folder is None or (folder / "adapter_config.json").exists():
        return None
    config = _config(folder, path)
    if config.get("auto_map"):  # the model brings its own code: refused, or its own business when trusted
        if not trust_remote_code:
            raise ConfigError(f"{path} needs its own Python code to load; modpo runs it only with "
                              "trust_remote_code: true (off by default)")
        return config
    keys = weight_keys(folder, path)
    architectures = config.get("architectures") or []
    prefix = f"{where}: " if where != "model" else ""
    if head == "causal_lm" and architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel",
                                                                      "ForConditionalGeneration")) for a in architectures):
        raise ConfigError(f"{prefix}{path} is a {architectures[0]}, not a causal LM: its log-probs are needed here "
                          "(give a language model, e.g. the output of `modpo sft`)")
    if head == "score" and not any(k.endswith(("score.weight", "classifier.weight")) for k in keys):
        raise ConfigError(f"{prefix}{path} holds no trained classification head (missing score.weight): a reward "
                          "model must be a sequence-classification model, e.g. the output of `modpo reward`")
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if tokens is not None and isinstance(vocab, int) and tokens > vocab:
        raise ConfigError(f"{prefix}the tokenizer has {tokens} tokens but {path} has vocab_size {vocab}: token ids "
                          f"{vocab} and above have no embedding; give the model's own tokenizer")
    return config


def check_data_file(spec, name: str, preferences: bool = True) -> None:
    """A data path exists and is readable, and its rows share one format: every prompt text, or every one chat.
    Where they do not, a preference file's own row errors (checked by loading it) come first."""
    path = spec.get("path") if isinstance(spec, dict) else spec
    if not isinstance(path, str):
        return
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(path, None, None, "no such file")
    _readable(file, "data file")
    if not isinstance(spec, str) or not file.name.lower().endswith(ROW_FILE_SUFFIXES):
        return  # parquet columns have one type; a named loader makes its own rows
    first = None
    for row, record in _read_numbered(file):
        field = next((f for f in ("prompt", "messages") if f in record), None)
        if field is None:
            continue
        kind = "chat" if isinstance(record[field], list) else "text"
        if first is None:
            first = (row, kind)
        elif kind != first[1]:
            if preferences:
                try:
                    load_preferences(path)  # a row that is wrong in itself is named as such
                except DataError:
                    raise
                except (TypeError, ValueError):  # pyarrow's refusal of the mixed column: the message below says it
                    pass
            what = {"chat": "a message list", "text": "text"}
            raise DataError(path, row, field, f"is {what[kind]}, but row {first[0]}'s is {what[first[1]]}: every row "
                                              "of a file must have the same format (all text, or all chat messages)")


def preflight(cfg: StageConfig, stage: str, overwrite: bool = False) -> None:
    """Refuse (one line) a stage whose settings, inputs or output folder would make it fail after loading."""
    check_training_settings(cfg.training, stage)
    check_margin_settings(cfg.margins)
    models = [("model", cfg.model), ("ref_model", cfg.ref_model), ("tokenizer", cfg.tokenizer)]
    models += [(f"margins[{i}]", m.get(k)) for i, m in enumerate(cfg.margins) if isinstance(m, dict)
               for k in ("model", "ref_model")]
    check_output_folder(cfg.output_dir, overwrite, [(key, path) for key, path in models if isinstance(path, str)])
    check_writable(cfg.output_dir)
    tokens = _tokenizer_tokens(cfg.tokenizer or cfg.model)
    policy = check_model(cfg.model, "model", "causal_lm" if stage in LOGP_STAGES else None, tokens,
                         cfg.trust_remote_code)
    if cfg.ref_model:
        ref = check_model(cfg.ref_model, "ref_model", "causal_lm", tokens)
        _same_vocabulary(policy, ref, cfg.model, cfg.ref_model, "ref_model")
    for i, margin in enumerate(cfg.margins):
        if not isinstance(margin, dict):
            continue
        kind, where = margin.get("type"), f"margins[{i}]"
        same_tokenizer = kind == "implicit_reward" and margin.get("same_tokenizer", True)
        for key in ("model", "ref_model"):
            if isinstance(margin.get(key), str):
                head = "score" if kind == "reward_model" else "causal_lm" if kind == "implicit_reward" else None
                config = check_model(margin[key], where, head, tokens if same_tokenizer else None)
                if same_tokenizer:
                    _same_vocabulary(policy, config, cfg.model, margin[key], where)
    check_data_file(cfg.train_data, "train_data", preferences=stage != "sft")
    check_data_file(cfg.eval_data, "eval_data", preferences=stage != "sft")


def _tokenizer_tokens(path: str) -> int | None:
    """The tokenizer's size where it is a local folder with tokenizer.json; refuses a folder without tokenizer files."""
    folder = _local_folder(path)
    if folder is None:
        return None
    if not any(folder.glob("tokenizer*")):
        raise ConfigError(f"cannot load a tokenizer from {path}: the folder holds no tokenizer files (tokenizer.json, "
                          "tokenizer_config.json); give `tokenizer:` a folder that does")
    return tokenizer_size(folder)


def _same_vocabulary(policy: dict | None, other: dict | None, policy_path: str, other_path: str, where: str) -> None:
    a, b = (c.get("vocab_size") if c else None for c in (policy, other))
    if isinstance(a, int) and isinstance(b, int) and a != b:
        raise ConfigError(f"{where}: {other_path} has vocab_size {b} but the model {policy_path} has {a}: log-probs of "
                          "the same tokens must come from the same vocabulary")


def check_evaluation(evaluation: dict) -> None:
    """`modpo front`'s evaluation settings, before the first point trains."""
    check_evaluation_settings(evaluation)
    for i, spec in enumerate(evaluation.get("evaluators") or []):
        if isinstance(spec, dict) and isinstance(spec.get("model"), str):
            head = {"reward_model": "score", "implicit_reward": "causal_lm"}.get(spec.get("type"))
            check_model(spec["model"], f"evaluation.evaluators[{i}]", head)
    for name, model in (evaluation.get("extra_models") or {}).items():
        if isinstance(model, str):
            check_model(model, f"evaluation.extra_models.{name}", "causal_lm")
    if evaluation.get("kl_reference") is not None:
        if not isinstance(evaluation["kl_reference"], str):
            raise ConfigError(f"evaluation.kl_reference = {evaluation['kl_reference']!r}: give a model folder or id")
        check_model(evaluation["kl_reference"], "evaluation.kl_reference", "causal_lm")
    if not isinstance(evaluation.get("prompts"), list):
        check_data_file(evaluation.get("prompts"), "evaluation.prompts")



def guarded_stage(stage: str | None = None):
    """Decorate a stage function `(cfg, [stage,] resume=..., overwrite=...)`: the preflight runs first, then the
    stage runs holding its output folder's lock. `stage=None` takes the stage name from the first argument."""
    def wrap(run):
        @functools.wraps(run)
        def guarded(cfg: StageConfig, *args, **kwargs):
            name = stage or kwargs.get("stage") or (args[0] if args else "train")
            preflight(cfg, name, kwargs.get("overwrite", False))
            with output_lock(cfg.output_dir):
                return run(cfg, *args, **kwargs)
        return guarded
    return wrap


def preflight_front(cfg: FrontConfig, overwrite: bool = False) -> None:
    """A front's checks before its first point trains: its evaluation and training settings, its folder."""
    check_evaluation(cfg.evaluation)
    train = cfg.train if isinstance(cfg.train, dict) else {}
    check_training_settings(train.get("training") or {}, "train")
    check_margin_settings(train.get("margins") or [])
    inputs = [(key, train.get(key)) for key in ("model", "ref_model", "tokenizer")]
    check_output_folder(cfg.output_dir, overwrite, [(k, v) for k, v in inputs if isinstance(v, str)])
    check_writable(cfg.output_dir)


def guarded_front(run):
    """Decorate `run_front(cfg, ...)`: its preflight, then the sweep holding the front folder's lock."""
    @functools.wraps(run)
    def guarded(cfg: FrontConfig, *args, **kwargs):
        preflight_front(cfg, kwargs.get("overwrite", False))
        with output_lock(cfg.output_dir):
            return run(cfg, *args, **kwargs)
    return guarded
