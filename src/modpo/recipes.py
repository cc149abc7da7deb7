"""Recipes: a YAML list of stages run in order, each skipped when its finished run is already on disk.

    variables: {root: runs/pku, data_dir: ../shared/data}   # ${name} is replaced in every string below
    stages:
      - {command: materialize, model: pkg:smollm2, output_dir: ${root}/base}
      - {command: dpo, config: {...StageConfig...}}
      - {command: front, config: {...FrontConfig...}}

Commands: materialize, sft, reward, dpo, train, front. Recipes shipped with modpo live in
`modpo/recipes/*.yaml`; `modpo recipe pku_safety` finds them by name. Every stage is checked (its keys, its
config, its data files) before the first one runs.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from modpo.errors import ConfigError
from modpo.front.sweep import run_front
from modpo.models import materialize
from modpo.run_config import FrontConfig, StageConfig, from_dict, read_yaml
from modpo.stages import STAGES

logger = logging.getLogger(__name__)
SHIPPED = Path(__file__).parent / "recipes"
COMMANDS = ("materialize", "sft", "reward", "dpo", "train", "front")
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


def check_data_files(raw, variables: dict, where: str, recipe: str) -> None:
    """Every input file the stage names exists; for a missing one, name the variables it came from."""
    if isinstance(raw, list):
        for item in raw:
            check_data_files(item, variables, where, recipe)
    if not isinstance(raw, dict):
        return
    for key, value in raw.items():
        if key not in DATA_KEYS or not isinstance(value, str):
            check_data_files(value, variables, where, recipe)
            continue
        path = substitute(value, variables, where)
        if not Path(str(path)).exists():
            names = list(dict.fromkeys(VARIABLE.findall(value)))
            hint = f"; set {', '.join(names)} on the command line (modpo recipe {recipe} {names[0]}=...)" if names else ""
            raise ConfigError(f"{where}: data file {path} does not exist{hint}")


def load_recipe(name: str, overrides: dict | None = None, only: list[str] | None = None) -> tuple[Path, list]:
    """The recipe's path and its stages as (command, materialize settings or config), all checked; the data
    files of the stages that will run (those in `only`, or all) must exist."""
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
    checked = []
    for i, raw in enumerate(stages):
        where = f"{path}: stages[{i}]"
        command = check_stage(raw, where)
        if not only or command in only:
            check_data_files(raw, variables, where, name)
        stage = substitute(raw, variables, where)
        if command == "front":
            stage = from_dict(FrontConfig, stage["config"], where)
        elif command != "materialize":
            stage = from_dict(StageConfig, stage["config"], where)
        checked.append((command, stage))
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
    path, stages = load_recipe(name, overrides, only)
    outputs = []
    for i, (command, stage) in enumerate(stages):
        if only and command not in only:
            continue
        started = time.time()
        logger.info("recipe %s: stage %d (%s)", path.name, i, command)
        if command == "materialize":
            outputs.append(materialize(stage["model"], stage["output_dir"], stage.get("dtype", "fp32")))
        elif command == "front":
            run_front(stage, overwrite=overwrite)
            outputs.append(stage.output_dir)
        else:
            checkpoints = resume and any(Path(stage.output_dir).glob("checkpoint-*"))
            outputs.append(str(STAGES[command](stage, resume=checkpoints, overwrite=overwrite)))
        logger.info("recipe %s: stage %d (%s) done in %.0f s", path.name, i, command, time.time() - started)
    return outputs
