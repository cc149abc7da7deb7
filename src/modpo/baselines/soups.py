"""DPO soups (personalized soups / rewarded soups): one DPO model per objective, parameters interpolated.

For weights w and per-objective models theta_k,

    full weights:   theta_w = sum_k w_k * theta_k
    LoRA adapters:  theta_w = theta_base + sum_k w_k * Delta_k,   Delta_k = the merged adapter delta B_k A_k * s_k

(the two agree for full models fine-tuned from one base when the weights sum to 1). Only floating-point
tensors are interpolated; integer buffers are taken from the first model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from modpo.cache import stable_hash, write_atomic
from modpo.models import load_model, load_tokenizer

SOUP_RUN = "modpo_run.json"  # the record `front.sweep.evaluate_model` keys its evaluation cache on


def interpolate_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                            base: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """sum_k w_k * sd_k, or base + sum_k w_k * (sd_k - base) when `base` is given."""
    if len(state_dicts) != len(weights) or not state_dicts:
        raise ValueError(f"{len(state_dicts)} state dicts but {len(weights)} weights")
    keys = list(state_dicts[0])
    for k, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(keys):
            missing = sorted(set(keys) ^ set(sd))[:5]
            raise ValueError(f"model {k} has different parameters from model 0 (e.g. {missing})")
    out = {}
    for name in keys:
        first = state_dicts[0][name]
        if not torch.is_floating_point(first):
            out[name] = first.clone()
            continue
        for k, sd in enumerate(state_dicts):
            if sd[name].shape != first.shape:
                raise ValueError(f"{name}: shape {tuple(sd[name].shape)} in model {k}, {tuple(first.shape)} in model 0")
        acc = torch.zeros_like(first, dtype=torch.float64)
        if base is not None:
            anchor = base[name].to(torch.float64)
            acc += anchor
            for w, sd in zip(weights, state_dicts):
                acc += float(w) * (sd[name].to(torch.float64) - anchor)
        else:
            for w, sd in zip(weights, state_dicts):
                acc += float(w) * sd[name].to(torch.float64)
        out[name] = acc.to(first.dtype)
    return out


def is_adapter(path) -> bool:
    return isinstance(path, (str, Path)) and (Path(path) / "adapter_config.json").exists()


def adapter_base(path) -> str:
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def merged_model(path_or_model):
    """The model with any LoRA adapter merged into its weights (a plain transformers model)."""

    if isinstance(path_or_model, (str, Path)):
        model = load_model(str(path_or_model))
    else:
        import copy

        model = copy.deepcopy(path_or_model)  # merging and loading the soup must not touch the caller's model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model


def soup_model(models: Sequence, weights: Sequence[float], base=None):
    """A model whose parameters interpolate `models` (paths or modules; full models or LoRA adapters).

    LoRA adapters are merged first and interpolated as deltas over their base (`base`, default: the
    adapters' base_model_name_or_path); full models are interpolated directly unless `base` is given.
    """

    adapters = [is_adapter(m) or hasattr(m, "merge_and_unload") for m in models]
    if any(adapters) and base is None:
        bases = {adapter_base(m) for m, a in zip(models, adapters) if a and is_adapter(m)}
        if len(bases) != 1:
            raise ValueError(f"LoRA soups need one shared base model; adapters name {sorted(bases) or 'none'}: pass base=")
        base = bases.pop()
    merged = [merged_model(m) for m in models]
    base_sd = None
    if base is not None:
        base_sd = (load_model(str(base)) if isinstance(base, (str, Path)) else base).state_dict()
    soup = interpolate_state_dicts([m.state_dict() for m in merged], weights, base_sd)
    out = merged[0]
    out.load_state_dict(soup)
    return out


def make_soup(models: Sequence[str], weights: Sequence[float], output_dir, base: str | None = None,
              tokenizer_from: str | None = None) -> Path:
    """Save the soup of `models` at `weights` into `output_dir` (a save_pretrained folder); reuse a finished one.

    A small run record (stage "soup") names the ingredients by their own run records, so an evaluation of
    the folder is redone whenever an ingredient was retrained.
    """

    out = Path(output_dir)
    identity = {"stage": "soup", "weights": [float(w) for w in weights], "models": [str(m) for m in models],
                "ingredients": [_run_identity(m) for m in models], "base": str(base) if base else None}
    key = stable_hash(identity)
    record_file = out / SOUP_RUN
    if record_file.exists() and json.loads(record_file.read_text()).get("config_hash") == key:
        return out
    import time

    started = time.time()
    model = soup_model(list(models), weights, base)
    model.save_pretrained(str(out))
    tokenizer_source = tokenizer_from or (adapter_base(models[0]) if is_adapter(models[0]) else str(models[0]))
    load_tokenizer(tokenizer_source).save_pretrained(str(out))
    record = {**identity, "config_hash": key, "wall_seconds": round(time.time() - started, 2),
              "token_counts": {"forward": 0, "backward": 0}}
    write_atomic(record_file, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
    return out


def _run_identity(path) -> str | None:
    run = Path(path) / "modpo_run.json"
    return json.loads(run.read_text()).get("config_hash") if run.exists() else None
