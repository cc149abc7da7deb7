"""Recipes: a YAML list of stages run in order, each skipped when its finished run is already on disk.

    variables: {root: runs/pku, data_dir: ../shared/data}   # ${name} is replaced in every string below
    stages:
      - {command: materialize, model: pkg:smollm2, output_dir: ${root}/base}
      - {command: dpo, config: {...StageConfig...}}
      - {command: front, config: {...FrontConfig...}}

Commands: materialize, label, sft, reward, dpo, train, front. Recipes shipped with modpo live in
`modpo/recipes/*.yaml`; `modpo recipe pku_safety` finds them by name. Every stage is checked (its keys, its
config, its data files) before the first one runs.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path

from trl import RewardConfig

from modpo import models, stages as stage_runners
from modpo.config import MODPOConfig
from modpo.data.encode import FitReport
from modpo.data.formats import check_preference_row, tokenize_reward_pairs, tokenize_row
from modpo.errors import ConfigError, DataError
from modpo.front import sweep
from modpo.labeling import LabelConfig, check_label_config, run_label
from modpo.run_config import FrontConfig, StageConfig, from_dict, read_yaml

logger = logging.getLogger(__name__)
SHIPPED = Path(__file__).parent / "recipes"
COMMANDS = ("materialize", "label", "sft", "reward", "dpo", "train", "front")
VARIABLE = re.compile(r"\$\{(\w+)\}")
DATA_KEYS = ("path", "train_data", "eval_data")  # keys whose string values are input files


def shipped_recipes() -> dict[str, dict]:
    """Name -> variables of every recipe shipped with modpo."""
    return {p.stem: read_yaml(p).get("variables") or {} for p in sorted(SHIPPED.glob("*.yaml"))}


def find_recipe(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    shipped = SHIPPED / f"{name}.yaml"
    if shipped.exists():
        return shipped
    raise ConfigError(f"recipe {name} not found (a YAML path, or one of: {', '.join(shipped_recipes())})")


def substitute(value, variables: dict, source: str):
    """Replace ${name} in every string of a nested structure."""
    if isinstance(value, str):
        whole = VARIABLE.fullmatch(value)
        if whole and whole.group(1) in variables:  # a lone ${name} keeps the variable's type
            return variables[whole.group(1)]

        def lookup(match):
            if match.group(1) not in variables:
                raise ConfigError(f"{source}: unknown variable ${{{match.group(1)}}}")
            return str(variables[match.group(1)])

        return VARIABLE.sub(lookup, value)
    if isinstance(value, list):
        return [substitute(v, variables, source) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, variables, source) for k, v in value.items()}
    return value


def check_stage(stage, where: str) -> str:
    """The stage's command, after checking the stage is a mapping with exactly the keys its command takes."""
    if not isinstance(stage, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{command: dpo, config: {{...}}}}, "
                          f"got {type(stage).__name__} {stage!r}")
    command = stage.get("command")
    if command not in COMMANDS:
        raise ConfigError(f"{where}: unknown command {command!r} ({', '.join(COMMANDS)})")
    required, optional = ({"model", "output_dir"}, {"dtype"}) if command == "materialize" else ({"config"}, set())
    missing = sorted(required - set(stage))
    if missing:
        raise ConfigError(f"{where}: {command} stage is missing key(s) {', '.join(missing)}")
    unknown = sorted(set(stage) - required - optional - {"command"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} for a {command} stage "
                          f"(known: command, {', '.join(sorted(required | optional))})")
    return command


def produced(path, earlier_outputs: list[str]) -> bool:
    """Whether `path` lies in a folder an earlier stage writes (e.g. the pairs a label stage makes)."""
    path = Path(str(path)).absolute()
    return any(path.is_relative_to(Path(folder).absolute()) for folder in earlier_outputs)


def check_data_files(raw, variables: dict, where: str, recipe: str, earlier_outputs: list[str] = ()) -> None:
    """Every input file the stage names exists, or an earlier stage writes it; for a missing one, name the
    variables it came from."""
    if isinstance(raw, list):
        for item in raw:
            check_data_files(item, variables, where, recipe, earlier_outputs)
    if not isinstance(raw, dict):
        return
    for key, value in raw.items():
        if key not in DATA_KEYS or not isinstance(value, str):
            check_data_files(value, variables, where, recipe, earlier_outputs)
            continue
        path = substitute(value, variables, where)
        if not Path(str(path)).exists() and not produced(path, earlier_outputs):
            names = list(dict.fromkeys(VARIABLE.findall(value)))
            hint = f"; set {', '.join(names)} on the command line (modpo recipe {recipe} {names[0]}=...)" if names else ""
            raise ConfigError(f"{where}: data file {path} does not exist{hint}")


def _setting(config_cls, training: dict, key: str):
    """A trainer setting of a stage: its `training` value (as the stage reads it), else the config's default."""
    if key in training:
        return stage_runners._as_field_type(config_cls, key, training[key])
    return next(f.default for f in dataclasses.fields(config_cls) if f.name == key)


def check_preference_data(checked: list, where: list[str], only: list[str] | None = None) -> None:
    """Encode the training data of every preference stage that will run (dpo, train, reward, front's train) with
    the tokenizer its model will have and the stage's max_length / long_prompts / max_prompt_length / append_eos,
    before anything trains: no model weights are loaded.

    A stage that would refuse a row (`long_prompts: refuse`, or a row that does not encode) is refused here in one
    line naming the stage, the file and the row; a stage that will cut or drop long prompts logs its warning line
    now. A model folder an earlier materialize stage writes is not there yet: its tokenizer is read from that
    stage's source (e.g. pkg:smollm2).
    """
    sources = {str(Path(s["output_dir"])): s["model"] for command, s in checked if command == "materialize"}
    labelled = [s.output_dir for command, s in checked if command == "label"]
    tokenizers = {}
    for (command, stage), name in zip(checked, where):
        if command not in ("dpo", "train", "reward", "front") or (only and command not in only):
            continue
        if command == "front":
            if not isinstance(stage.train, dict) or stage.train.get("train_data") is None:
                continue  # the front stage refuses it itself
            cfg = from_dict(StageConfig, {"output_dir": stage.output_dir, **stage.train}, f"{name}: train")
        else:
            cfg = stage
        if isinstance(cfg.train_data, str) and not Path(cfg.train_data).exists() and produced(cfg.train_data, labelled):
            continue  # pairs a label stage writes: checked when that stage has run
        path = cfg.tokenizer or cfg.model
        if not Path(path).exists() and str(Path(path)) in sources:
            path = sources[str(Path(path))]
        if path not in tokenizers:
            tokenizers[path] = models.load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
        tokenizer = tokenizers[path]
        try:
            data, file = stage_runners.load_data(cfg.train_data, "train_data")
        except DataError as err:  # the loader's own checks of the rows
            raise ConfigError(f"{name} ({command}): {err}") from None
        label = f"{name} ({command}): {file}"
        if command == "reward":  # DataError names the stage (label), file and row in one line
            tokenize_reward_pairs(data, tokenizer, _setting(RewardConfig, cfg.training, "max_length"), label)
            continue
        max_length, append_eos, long_prompts, max_prompt_length = (
            _setting(MODPOConfig, cfg.training, key)
            for key in ("max_length", "append_eos", "long_prompts", "max_prompt_length"))
        report = FitReport()
        for index, example in enumerate(data):
            row = example.get("source_row")
            check_preference_row(example, row, label, index=None if row else index)
            tokenize_row(example, tokenizer, max_length, row, label, report, append_eos, long_prompts,
                         max_prompt_length, index=None if row else index)
        if report.rows and len(report.dropped) == report.rows:
            raise ConfigError(f"{label}: every row would be dropped: each prompt is too long for max_length={max_length}")
        report.warn(label, max_length, "rows" if "source_row" in data.column_names else "indexes")


def load_recipe(name: str, overrides: dict | None = None, only: list[str] | None = None,
                check_data: bool = False) -> tuple[Path, list]:
    """The recipe's path and its stages as (command, materialize settings or config), all checked; the data
    files of the stages that will run (those in `only`, or all) must exist, and with `check_data` their
    preference data must encode (`check_preference_data`)."""
    path = find_recipe(name)
    recipe = read_yaml(path)
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path}: expected a mapping with variables and stages, got {type(recipe).__name__}")
    unknown = set(recipe) - {"variables", "stages", "description"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    variables, stages = recipe.get("variables") or {}, recipe.get("stages") or []
    if not isinstance(variables, dict) or not isinstance(stages, list):
        raise ConfigError(f"{path}: variables should be a mapping and stages a list")
    known = list(variables) + sorted(set(VARIABLE.findall(str(stages))) - set(variables))
    unknown = sorted(set(overrides or {}) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown variable(s) {', '.join(unknown)} (known: {', '.join(known)})")
    variables = {**variables, **(overrides or {})}
    checked, places, outputs = [], [], []
    for i, raw in enumerate(stages):
        where = f"{path}: stages[{i}]"
        places.append(where)
        command = check_stage(raw, where)
        if not only or command in only:
            check_data_files(raw, variables, where, name, outputs)
        stage = substitute(raw, variables, where)
        if command == "front":
            stage = from_dict(FrontConfig, stage["config"], where)
        elif command == "label":
            stage = from_dict(LabelConfig, stage["config"], where)
            check_label_config(stage, where)
        elif command != "materialize":
            stage = from_dict(StageConfig, stage["config"], where)
        checked.append((command, stage))
        outputs.append(str(stage["output_dir"] if command == "materialize" else stage.output_dir))
    if check_data:
        check_preference_data(checked, places, only)
    return path, checked


def run_recipe(name: str, overrides: dict | None = None, only: list[str] | None = None,
               overwrite: bool = False, resume: bool = False) -> list[str]:
    """Run every stage (or those whose command is in `only`); returns the output folders.

    `overwrite` and `resume` go to every training stage as on its own command line; `resume` continues a
    stage whose output_dir holds checkpoints and starts the others afresh.
    """
    unknown = sorted(set(only or ()) - set(COMMANDS))
    if unknown:
        raise ConfigError(f"--only: unknown command(s) {', '.join(unknown)} ({', '.join(COMMANDS)})")
    path, stages = load_recipe(name, overrides, only, check_data=True)
    outputs = []
    for i, (command, stage) in enumerate(stages):
        if only and command not in only:
            continue
        started = time.time()
        logger.info("recipe %s: stage %d (%s)", path.name, i, command)
        if command == "materialize":
            outputs.append(models.materialize(stage["model"], stage["output_dir"], stage.get("dtype", "fp32")))
        elif command == "front":
            sweep.run_front(stage, overwrite=overwrite)
            outputs.append(stage.output_dir)
        elif command == "label":
            outputs.append(str(run_label(stage, say=logger.info)))
        else:
            checkpoints = resume and any(Path(stage.output_dir).glob("checkpoint-*"))
            outputs.append(str(stage_runners.STAGES[command](stage, resume=checkpoints, overwrite=overwrite)))
        logger.info("recipe %s: stage %d (%s) done in %.0f s", path.name, i, command, time.time() - started)
    return outputs
