"""Recipes: a YAML list of stages run in order, each skipped when its finished run is already on disk.

    variables: {root: runs/pku}              # ${root} is replaced in every string below
    stages:
      - {command: materialize, model: pkg:smollm2, output_dir: ${root}/base}
      - {command: dpo, config: {...StageConfig...}}
      - {command: front, config: {...FrontConfig...}}

Commands: materialize, sft, reward, dpo, train, front. Recipes shipped with modpo live in
`modpo/recipes/*.yaml`; `modpo recipe pku_safety` finds them by name.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from modpo.errors import ConfigError
from modpo.run_config import FrontConfig, StageConfig, from_dict, read_yaml

logger = logging.getLogger(__name__)
SHIPPED = Path(__file__).parent / "recipes"


def find_recipe(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    shipped = SHIPPED / f"{name}.yaml"
    if shipped.exists():
        return shipped
    known = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
    raise ConfigError(f"recipe {name} not found (a YAML path, or one of: {known})")


def substitute(value, variables: dict, source: str):
    """Replace ${name} in every string of a nested structure."""
    if isinstance(value, str):
        whole = re.fullmatch(r"\$\{(\w+)\}", value)
        if whole and whole.group(1) in variables:  # a lone ${name} keeps the variable's type
            return variables[whole.group(1)]

        def lookup(match):
            if match.group(1) not in variables:
                raise ConfigError(f"{source}: unknown variable ${{{match.group(1)}}}")
            return str(variables[match.group(1)])

        return re.sub(r"\$\{(\w+)\}", lookup, value)
    if isinstance(value, list):
        return [substitute(v, variables, source) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, variables, source) for k, v in value.items()}
    return value


def run_recipe(name: str, overrides: dict | None = None, only: list[str] | None = None) -> list[str]:
    """Run every stage (or those whose command is in `only`); returns the output folders."""
    from modpo.front.sweep import run_front
    from modpo.models import materialize
    from modpo.stages import STAGES

    path = find_recipe(name)
    recipe = read_yaml(path)
    unknown = set(recipe) - {"variables", "stages", "description"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    variables = {**(recipe.get("variables") or {}), **(overrides or {})}
    outputs = []
    for i, stage in enumerate(recipe.get("stages") or []):
        where = f"{path}: stages[{i}]"
        stage = substitute(stage, variables, where)
        command = stage.get("command")
        if only and command not in only:
            continue
        started = time.time()
        logger.warning("recipe %s: stage %d (%s)", path.name, i, command)
        if command == "materialize":
            outputs.append(materialize(stage["model"], stage["output_dir"], stage.get("dtype", "fp32")))
        elif command == "front":
            cfg = from_dict(FrontConfig, stage.get("config", {}), where)
            run_front(cfg)
            outputs.append(cfg.output_dir)
        elif command in STAGES:
            cfg = from_dict(StageConfig, stage.get("config", {}), where)
            outputs.append(str(STAGES[command](cfg)))
        else:
            raise ConfigError(f"{where}: unknown command {command!r} (materialize, sft, reward, dpo, train, front)")
        logger.warning("recipe %s: stage %d (%s) done in %.0f s", path.name, i, command, time.time() - started)
    return outputs
