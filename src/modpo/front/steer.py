"""Steering one weight-conditioned model at inference: `modpo generate --model DIR --weights 0.3,0.7 "prompt"`.

The model's run record (`modpo_run.json`, written by `modpo train` with `weight_sampling`) says it is conditioned
and on how many objectives and in which format; the weights asked for are checked (length, w_0 > 0, on the
simplex) and shown exactly as in training (`steering`): rendered before the prompt (`modpo.conditioning.render`), or
as the learned c(w) added to the input embeddings (`modpo.weight_embedding`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from modpo.conditioning import check_request, condition_ids
from modpo.errors import ConfigError
from modpo.front.generate import SamplingSettings, sample_responses
from modpo.models import load_model, load_tokenizer
from modpo.weight_embedding import WeightEmbedding, applied


def conditioning_of(model_dir: str | Path) -> dict:
    """The `conditioning` record of a conditioned model's folder; ConfigError for any other folder."""
    record_file = Path(model_dir) / "modpo_run.json"
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{model_dir}: no readable modpo_run.json; weights steer only a model trained by "
                          "`modpo train` with training.weight_sampling") from None
    conditioning = record.get("conditioning")
    if not conditioning:
        raise ConfigError(f"{model_dir} is not weight-conditioned (trained for the fixed weights "
                          f"{record.get('weights')}); train with training.weight_sampling to steer one model")
    return conditioning


@contextlib.contextmanager
def steering(model_dir: str | Path, model, tokenizer, weights: list[float]):
    """Within the block the conditioned `model` (loaded from `model_dir`) is steered to `weights`, shown as in
    training; yields the token ids to put before every prompt (none in the `embedding` format)."""
    conditioning = conditioning_of(model_dir)
    grid = check_request(weights, conditioning["num_objectives"])
    if conditioning.get("format", "prefix") == "prefix":
        yield condition_ids(grid, tokenizer)
        return
    embedding = WeightEmbedding.load(model_dir).to(next(model.parameters()).device)
    with applied(model.get_input_embeddings(), embedding, torch.tensor([[grid]])):
        yield []


def steer(model_dir: str | Path, prompts: list, weights: list[float], settings: SamplingSettings | None = None,
          model=None, tokenizer=None) -> list[dict]:
    """[{prompt, response, sample, weights}] sampled from the conditioned model at `weights`."""
    conditioning = conditioning_of(model_dir)
    try:
        grid = check_request(weights, conditioning["num_objectives"])
    except ValueError as err:
        raise ConfigError(f"--weights: {err}") from None
    tokenizer = tokenizer or load_tokenizer(str(model_dir))
    model = model or load_model(str(model_dir))
    with steering(model_dir, model, tokenizer, grid) as prefix:
        samples = sample_responses(model, tokenizer, prompts, settings or SamplingSettings(), desc=f"w = {grid}",
                                   prefix=prefix)
    return [{**s, "weights": grid} for s in samples]
