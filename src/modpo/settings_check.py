"""Numeric settings checked before anything runs: each out-of-range value refused in one line that names its key.

Training (`training:` of a stage), margin sources (`margins:`) and a front's sampling (`evaluation:`). A value
YAML 1.1 reads as text (`1e-3`) counts as the number it spells; one that is no number is refused.
"""

from __future__ import annotations

import math

from modpo.errors import ConfigError
from modpo.scorers import parse_spec

BATCH_KEYS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")


def number(value, where: str, integer: bool = False) -> float | int:
    """`value` as a finite number (an int where `integer`), or a one-line ConfigError naming `where`."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where} = {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} = {value!r} is not a number")
    if not math.isfinite(value):
        raise ConfigError(f"{where} = {value} must be a finite number")
    if integer:
        if value != int(value):
            raise ConfigError(f"{where} = {value} must be a whole number")
        return int(value)
    return value


def _at_least(settings: dict, key: str, where: str, low, integer: bool = False) -> None:
    if settings.get(key) is None:
        return
    value = number(settings[key], f"{where}{key}", integer)
    if value < low:
        raise ConfigError(f"{where}{key} = {value} must be at least {low}")


def check_training_settings(training: dict, stage: str) -> None:
    """Learning rate >= 0, batch sizes >= 1, max_length an int >= 2, and at least one training step."""
    if not isinstance(training, dict):
        return
    where = "training: "
    if training.get("learning_rate") is not None:
        rate = number(training["learning_rate"], "training: learning_rate")
        if rate < 0:
            raise ConfigError(f"training: learning_rate = {rate} must be >= 0")
    for key in BATCH_KEYS:
        _at_least(training, key, where, 1, integer=True)
    _at_least(training, "max_length", where, 2, integer=True)
    steps = training.get("max_steps")
    steps = -1 if steps is None else number(steps, "training: max_steps", integer=True)
    epochs = number(training.get("num_train_epochs", 3.0), "training: num_train_epochs")
    if steps == 0 or (steps < 0 and epochs <= 0):
        said = "max_steps = 0" if steps == 0 else f"num_train_epochs = {epochs:g}"
        raise ConfigError(f"training: {said}: the run would train no steps; give max_steps >= 1 or "
                          "num_train_epochs > 0")


def check_margin_settings(margins) -> None:
    """Each implicit-reward margin's beta is finite and > 0; a source's max_length is an int >= 2."""
    for i, spec in enumerate(margins if isinstance(margins, list) else []):
        if isinstance(spec, dict):
            _check_source(spec, f"margins[{i}]: ")


def _check_source(spec: dict, where: str) -> None:
    if spec.get("type") == "implicit_reward" and spec.get("beta") is not None:
        beta = spec["beta"]
        try:
            value = float(beta) if not isinstance(beta, bool) else math.nan
        except (TypeError, ValueError):
            raise ConfigError(f"{where}beta = {beta!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{where}beta = {beta} must be a finite number > 0")
    _at_least(spec, "max_length", where, 2, integer=True)
    if spec.get("type") == "scorer":  # its keys, its form, and that its package is installed: nothing is imported
        _at_least(spec, "batch_size", where, 1, integer=True)
        parse_spec({k: v for k, v in spec.items() if k not in ("type", "scale", "batch_size", "names", "check",
                                                                 "max_length")}, where.rstrip(": "))


def check_evaluation_settings(evaluation: dict) -> None:
    """Sampling: batch_size >= 1, samples_per_prompt >= 1, max_new_tokens >= 1, min_new_tokens >= 0 and at most
    max_new_tokens, temperature >= 0, 0 < top_p <= 1; evaluators' beta and max_length as for margins."""
    if not isinstance(evaluation, dict):
        return
    where = "evaluation: "
    for key in ("batch_size", "samples_per_prompt", "max_new_tokens"):
        _at_least(evaluation, key, where, 1, integer=True)
    _at_least(evaluation, "min_new_tokens", where, 0, integer=True)
    if evaluation.get("seed") is not None:
        number(evaluation["seed"], f"{where}seed", integer=True)
    if evaluation.get("min_new_tokens") is not None and evaluation.get("max_new_tokens") is not None:
        if int(evaluation["min_new_tokens"]) > int(evaluation["max_new_tokens"]):
            raise ConfigError(f"{where}min_new_tokens = {evaluation['min_new_tokens']} is more than max_new_tokens = "
                              f"{evaluation['max_new_tokens']}")
    if evaluation.get("temperature") is not None:
        temperature = number(evaluation["temperature"], f"{where}temperature")
        if temperature < 0:
            raise ConfigError(f"{where}temperature = {temperature} must be >= 0 (0 samples greedily)")
    if evaluation.get("top_p") is not None:
        top_p = number(evaluation["top_p"], f"{where}top_p")
        if not 0 < top_p <= 1:
            raise ConfigError(f"{where}top_p = {top_p} must be in (0, 1]")
    for i, spec in enumerate(evaluation.get("evaluators") or []):
        if isinstance(spec, dict):
            _check_source(spec, f"evaluation.evaluators[{i}]: ")
