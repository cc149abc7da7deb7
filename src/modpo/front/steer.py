"""Steering one weight-conditioned model at inference: `modpo generate --model DIR --weights 0.3,0.7 "prompt"`.

The model's conditioning record (`modpo_conditioning.json`, written by `MODPOTrainer.save_model`, so by `modpo
train` with `weight_sampling` and by the Python API alike) says it is conditioned, on how many objectives and in
which format; the weights asked for are checked (length, w_0 > 0, on the
simplex) and shown exactly as in training (`steering`): rendered before the prompt (`modpo.conditioning.render`), or
as the learned c(w) added to the input embeddings (`modpo.weight_embedding`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from modpo.conditioning import RECORD_FILE, check_request, condition_ids, read_record
from modpo.errors import ConfigError
from modpo.front.generate import SamplingSettings, sample_responses
from modpo.models import load_model, load_tokenizer
from modpo.run_records import RUN_FILE
from modpo.weight_embedding import WeightEmbedding, applied


def conditioning_of(model_dir: str | Path) -> dict:
    """The conditioning record of a conditioned model's folder (`RECORD_FILE`, or the `conditioning` entry of the
    run record of a folder saved before that file); ConfigError for any other folder."""
    try:
        record = read_record(model_dir)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if record is not None:
        return record
    try:
        run = json.loads((Path(model_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{model_dir}: no {RECORD_FILE}; weights steer only a model trained with "
                          "training.weight_sampling and saved by modpo train or MODPOTrainer.save_model") from None
    if not run.get("conditioning"):
        raise ConfigError(f"{model_dir} is not weight-conditioned (trained for the fixed weights "
                          f"{run.get('weights')}); train with training.weight_sampling to steer one model")
    return run["conditioning"]


@contextlib.contextmanager
def shown(model, tokenizer, grid: list[float], embedding: WeightEmbedding | None = None):
    """Within the block `model` sees the weights `grid` as in training; yields the token ids to put before every
    prompt: the rendered weights, or none where `embedding` (c(w)) is added to the input embeddings instead."""
    if embedding is None:
        yield condition_ids(grid, tokenizer)
        return
    with applied(model.get_input_embeddings(), embedding, torch.tensor([[grid]])):
        yield []


@contextlib.contextmanager
def steering(model_dir: str | Path, model, tokenizer, weights: list[float]):
    """Within the block the conditioned `model` (loaded from `model_dir`) is steered to `weights`, shown as in
    training; yields the token ids to put before every prompt (none in the `embedding` format)."""
    conditioning = conditioning_of(model_dir)
    grid = check_request(weights, conditioning["num_objectives"])
    embedding = weight_embedding_of(model_dir, conditioning, model)
    with shown(model, tokenizer, grid, embedding) as prefix:
        yield prefix


def weight_embedding_of(model_dir: str | Path, conditioning: dict, model) -> WeightEmbedding | None:
    """c(w) of a model in the `embedding` format, on the model's device; None in the `prefix` format."""
    if conditioning.get("format", "prefix") == "prefix":
        return None
    return WeightEmbedding.load(model_dir).to(next(model.parameters()).device)


class SteeredModel:
    """A conditioned model, loaded once from its folder and steered per call (`generate`): what `modpo generate`,
    `steer()` and `modpo serve` sample with."""

    def __init__(self, model_dir: str | Path, model=None, tokenizer=None):
        self.model_dir = Path(model_dir)
        self.conditioning = conditioning_of(model_dir)  # before anything loads: a wrong folder fails at once
        self.num_objectives = self.conditioning["num_objectives"]
        self.objectives = self.conditioning.get("objectives") or [f"objective_{k}" for k in range(self.num_objectives)]
        self.tokenizer = tokenizer or load_tokenizer(str(model_dir))
        self.model = model or load_model(str(model_dir))
        self.embedding = weight_embedding_of(model_dir, self.conditioning, self.model)

    def checked(self, weights: list[float]) -> list[float]:
        """The weights on the rendering's grid, or ValueError saying why the model cannot mean them."""
        return check_request(weights, self.num_objectives)

    def generate(self, prompts: list, weights: list[float], settings: SamplingSettings | None = None) -> list[dict]:
        """[{prompt, response, sample, weights}] sampled at `weights` (checked: ValueError)."""
        grid = self.checked(weights)
        with shown(self.model, self.tokenizer, grid, self.embedding) as prefix:
            samples = sample_responses(self.model, self.tokenizer, prompts, settings or SamplingSettings(),
                                       desc=f"w = {grid}", prefix=prefix)
        return [{**s, "weights": grid} for s in samples]


def steer(model_dir: str | Path, prompts: list, weights: list[float], settings: SamplingSettings | None = None,
          model=None, tokenizer=None) -> list[dict]:
    """[{prompt, response, sample, weights}] sampled from the conditioned model at `weights`."""
    conditioning = conditioning_of(model_dir)
    try:
        check_request(weights, conditioning["num_objectives"])  # before the model loads
    except ValueError as err:
        raise ConfigError(f"--weights: {err}") from None
    return SteeredModel(model_dir, model, tokenizer).generate(prompts, weights, settings)
