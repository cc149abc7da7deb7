"""Which model is the reference, and its cache key: the policy as it starts, keyed by exactly what it computes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from modpo import MODPOConfig, MODPOTrainer
from modpo import stages
from modpo.logps import batched_sequence_logps
from modpo.models import load_model
from modpo.reference import StartInfo, prepare_policy, reference_for
from modpo.run_config import StageConfig

import tiny

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def config(tmp_path, **kwargs) -> MODPOConfig:
    settings = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no", seed=0,
                    max_length=32, per_device_train_batch_size=4, max_steps=1, disable_tqdm=True)
    settings.update(kwargs)
    return MODPOConfig(**settings)


def lora_adapter(base_dir: str, folder: Path, seed: int) -> str:
    """A LoRA adapter over the model in `base_dir` with seeded random (non-zero) weights, saved to `folder`."""
    model = get_peft_model(load_model(base_dir), LoraConfig(**LORA))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return tiny.save(model, tiny.tokenizer(), folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    tok = tiny.tokenizer()
    base = tiny.save(tiny.model(len(tok), seed=3), tok, root / "base")
    return {"base": base, "sft": lora_adapter(base, root / "sft", seed=1), "other": lora_adapter(base, root / "other", seed=2)}


@pytest.fixture(scope="module")
def data() -> Dataset:
    return Dataset.from_list(tiny.rows(6, seed=4))


def logps(model, trainer: MODPOTrainer, side: str = "chosen") -> torch.Tensor:
    """log pi(side | prompt) of `model` on the trainer's tokenized rows, computed here."""
    rows = trainer.train_dataset
    return batched_sequence_logps(model, rows["prompt_ids"], rows[f"{side}_ids"], trainer.processing_class.pad_token_id)


def merged(adapter_dir: str):
    """The adapter folder's model as one plain model, loaded on its own."""
    return AutoPeftModelForCausalLM.from_pretrained(adapter_dir).merge_and_unload().eval()


def reference_logps(trainer: MODPOTrainer, side: str = "chosen") -> torch.Tensor:
    return torch.tensor(trainer.train_dataset[f"ref_{side}_logps"])


def cache_entries(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "modpo-cache" / "reference_logps").iterdir())


# ----------------------------------------------------------------------------------- a LoRA SFT folder as model

@pytest.mark.parametrize("new_adapter", [False, True])
def test_reference_of_a_lora_sft_folder_is_the_sft_model(tmp_path, folders, data, new_adapter):
    peft_config = LoraConfig(**LORA) if new_adapter else None
    trainer = MODPOTrainer(folders["sft"], args=config(tmp_path), train_dataset=data, peft_config=peft_config)
    sft, base = merged(folders["sft"]), load_model(folders["base"]).eval()
    for side in ("chosen", "rejected"):
        expected = logps(sft, trainer, side)
        assert (expected - logps(base, trainer, side)).abs().max() > 1e-2, "the SFT adapter must matter"
        assert torch.allclose(reference_logps(trainer, side), expected, atol=1e-5)
    assert trainer.start_merged == new_adapter
    assert list(trainer.model.peft_config) == ["default"]  # one adapter: no second one stacked on the first
    assert type(trainer.model.get_base_model()) is LlamaForCausalLM
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and "base_layer" not in n for n in trainable)
    if new_adapter:  # the new adapter starts as a no-op over the merged SFT model
        lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
        assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    else:  # the SFT adapter itself keeps training, from its saved values
        saved = AutoPeftModelForCausalLM.from_pretrained(folders["sft"]).state_dict()
        assert all(torch.equal(saved[n], p) for n, p in trainer.model.state_dict().items() if "lora_" in n)


def test_a_new_adapter_over_a_merged_start_trains_alone_and_saves_standalone(tmp_path, folders, data):
    trainer = MODPOTrainer(folders["sft"], args=config(tmp_path, max_steps=2, learning_rate=5e-2), train_dataset=data,
                           peft_config=LoraConfig(**LORA))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)
    out = tmp_path / "merged"
    trainer.save_merged_model(str(out))
    assert not (out / "adapter_config.json").exists()
    saved = AutoModelForCausalLM.from_pretrained(out).eval()  # no peft involved
    assert not any("lora_" in n for n in saved.state_dict())
    trainer.model.eval()
    expected = logps(trainer.model, trainer)
    assert (expected - reference_logps(trainer)).abs().max() > 1e-4, "training must have moved the policy"
    assert torch.allclose(logps(saved, trainer), expected, atol=1e-5)
    assert list(trainer.model.peft_config) == ["default"] and any("lora_B" in n for n in trainer.model.state_dict())


def test_the_stage_saves_a_merged_start_as_a_standalone_model(tmp_path, folders, monkeypatch):
    seen = {}
    finish = stages.finish

    def spying(trainer, *args, **kwargs):
        seen["trainer"] = trainer
        return finish(trainer, *args, **kwargs)

    monkeypatch.setattr(stages, "finish", spying)
    train_data = tiny.write_jsonl(tmp_path / "pairs.jsonl", tiny.rows(8, seed=5))
    cfg = StageConfig(model=folders["sft"], output_dir=str(tmp_path / "dpo"), train_data=train_data,
                      lora=dict(LORA), training={"use_cpu": True, "report_to": [], "save_strategy": "no",
                                                 "max_steps": 2, "per_device_train_batch_size": 4,
                                                 "learning_rate": 5e-2, "disable_tqdm": True})
    out = stages.run_preference(cfg, stage="dpo")
    trainer = seen["trainer"]
    assert trainer.start_merged and not (out / "adapter_config.json").exists()
    assert "saved as: a standalone model" in (out / "README.md").read_text()
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    trainer.model.eval()
    assert torch.allclose(logps(saved, trainer), logps(trainer.model, trainer), atol=1e-5)
    assert torch.allclose(logps(saved, trainer, "rejected"), logps(trainer.model, trainer, "rejected"), atol=1e-5)


# ------------------------------------------------------------------------------------------- explicit references

def test_two_adapter_references_over_one_base_are_two_cache_entries(tmp_path, folders, data):
    found = {}
    for name in ("sft", "other"):
        trainer = MODPOTrainer(load_model(folders["base"]), ref_model=folders[name], args=config(tmp_path),
                               train_dataset=data, processing_class=tiny.tokenizer())
        found[name] = reference_logps(trainer)
        assert torch.allclose(found[name], logps(merged(folders[name]), trainer), atol=1e-5)  # the adapter is on
    assert len(cache_entries(tmp_path)) == 2
    assert (found["sft"] - found["other"]).abs().max() > 1e-2


def test_a_changed_model_config_or_attention_is_a_new_reference(tmp_path, data):
    tok = tiny.tokenizer()
    model = tiny.perturbed(tiny.model(len(tok), seed=6), seed=6, scale=0.3)  # attention far from uniform

    def variant(**changes):
        config = copy.deepcopy(model.config)
        for key, value in changes.items():
            setattr(config, key, value)
        out = LlamaForCausalLM(config)
        out.load_state_dict(model.state_dict())  # the same weights; rotary frequencies are not among them
        return out

    variants = {"base": copy.deepcopy(model), "eps": variant(rms_norm_eps=0.5),
                "rope": variant(rope_parameters={"rope_type": "default", "rope_theta": 10.0})}
    variants["eager"] = copy.deepcopy(model)
    variants["eager"].set_attn_implementation("eager")
    found = {}
    for name, policy in variants.items():
        trainer = MODPOTrainer(policy, args=config(tmp_path), train_dataset=data, processing_class=tok)
        found[name] = reference_logps(trainer)
        assert torch.allclose(found[name], logps(policy, trainer), atol=1e-5)
    assert len(cache_entries(tmp_path)) == 4
    assert (found["eps"] - found["base"]).abs().max() > 1e-3
    assert (found["rope"] - found["base"]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- reference_for keys

def test_the_key_skips_only_a_disabled_adapter(folders):
    policy, info = prepare_policy(load_model(folders["base"]), LoraConfig(**LORA), seed=0)
    assert info == StartInfo(merged=False, new_adapter=True)
    off = reference_for(policy, info=info)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(1.0)  # the disabled adapter: not part of what the reference computes
    assert reference_for(policy, info=info).key == off.key
    assert reference_for(policy).key != off.key  # the same model with its adapter on
    with torch.no_grad():
        next(p for n, p in policy.named_parameters() if "base_layer" in n).add_(1e-3)
    assert reference_for(policy, info=info).key != off.key

    start, kept = prepare_policy(load_model(folders["sft"]), None)  # an adapter that keeps training: it is on
    assert kept == StartInfo()
    on = reference_for(start, info=kept).key
    with torch.no_grad():
        next(p for n, p in start.named_parameters() if "lora_A" in n).add_(1e-3)
    assert reference_for(start, info=kept).key != on
