"""Run records: what a finished stage is (its config and the contents of its inputs), whether an output folder
already holds it, and which checkpoint `--resume` continues from.

A stage's output folder ends with `modpo_run.json` (written last, atomically). A rerun with the same config reuses
the run only while its data and model files hold the same bytes (`input_stamp`: a SHA-256 of each file, or size
and modification time above 256 MiB); a different run into the folder is refused unless `--overwrite`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from pathlib import Path

from modpo.cache import stable_hash
from modpo.errors import ConfigError
from modpo.models import resolve
from modpo.run_config import StageConfig

logger = logging.getLogger(__name__)

RUN_FILE = "modpo_run.json"
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
