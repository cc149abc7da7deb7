"""Which model is the reference pi_ref, and the cache key of exactly what it computes.

One rule: pi_ref is the policy as it starts training.

* A plain model with a new `peft_config`: a new adapter goes on top; pi_ref is the model with it disabled.
* A PeftModel (e.g. a LoRA SFT adapter loaded from a folder) with a new `peft_config`: the starting adapter is
  merged first (`merge_and_unload`, so the SFT model is the base), then the new adapter goes on top; pi_ref is
  the merged model with the new adapter disabled. The trained adapter then sits on a base that exists in no
  folder, so the result is saved as a standalone model (`StartInfo.merged`, `MODPOTrainer.save_merged_model`).
* A PeftModel without a new `peft_config`: its adapter keeps training; pi_ref is the model with that adapter on,
  as it starts (the precompute runs before any training step).
* A plain model without `peft_config`: the model itself.
* An explicit `ref_model` (a module, or a path loaded by `models.load_model`, an adapter folder too) is used as
  loaded, adapter on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from modpo.cache import model_identity
from modpo.errors import ConfigError


@dataclass
class StartInfo:
    """How `prepare_policy` set the policy up."""

    merged: bool = False  # the starting adapter was merged into the base; save the result standalone
    new_adapter: bool = False  # a new adapter was added on top; the reference runs with it disabled


@dataclass
class Reference:
    """The module that computes pi_ref, the context to run it in, and the cache key of what it computes."""

    module: torch.nn.Module
    context: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)
    key: dict = field(default_factory=dict)
    separate: bool = False  # a model of its own (not the policy): it goes back where it was after the precompute


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def adapter_tensor_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of every adapter's own tensors (LoRA A/B and the like, adapter copies of saved modules)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapters = set(getattr(model, "peft_config", {}))
    prefixes = []
    for module_name, module in model.named_modules():
        attributes = (module.adapter_layer_names + module.other_param_names if isinstance(module, BaseTunerLayer)
                      else ("modules_to_save",))
        for attribute in attributes:
            holder = getattr(module, attribute, None)
            if isinstance(holder, (torch.nn.ModuleDict, torch.nn.ParameterDict)):
                prefixes += [f"{module_name}.{attribute}.{a}" for a in adapters if a in holder]
    return {name for name in model.state_dict()
            if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)}


def continue_training_adapter(model) -> None:
    """Make a loaded (inference-mode) adapter trainable again, and nothing else."""
    trainable = adapter_tensor_names(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    for config in model.peft_config.values():
        config.inference_mode = False


def prepare_policy(model, peft_config=None, seed: int | None = None):
    """(policy, StartInfo) following the module rule: merge a starting adapter under a new one, else keep it training."""
    info = StartInfo()
    if peft_config is None:
        if is_peft_model(model):
            continue_training_adapter(model)
        return model, info
    from peft import get_peft_model
    from transformers import set_seed

    if is_peft_model(model):
        model = model.merge_and_unload()  # the starting adapter (e.g. LoRA SFT) becomes part of the base
        info.merged = True
    if seed is not None:
        set_seed(seed)  # adapter initialisation follows the run's seed, as the Trainer's own setup does
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as err:  # e.g. target modules the model does not have
        raise ConfigError(f"lora: {str(err).splitlines()[0]}") from None
    info.new_adapter = True
    return model, info


def reference_for(policy, ref_model=None, info: StartInfo | None = None) -> Reference:
    """The reference to run for `policy` (prepared by `prepare_policy`) or the explicit `ref_model`."""
    if ref_model is not None:
        return Reference(ref_model, key=model_identity(ref_model), separate=True)
    if info is not None and info.new_adapter:
        # peft's disable_adapter turns every adapter off: none of their tensors take part.
        skipped = adapter_tensor_names(policy)
        return Reference(policy, context=policy.disable_adapter,
                         key=model_identity(policy, skip=skipped.__contains__))
    return Reference(policy, key=model_identity(policy))
