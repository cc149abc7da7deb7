"""The content-keyed tensor cache: computed once, reused, never trusted when torn or mislabelled."""

from __future__ import annotations

import copy
import logging
import shutil

import pytest
import torch
from datasets import Dataset

from modpo.cache import (
    cached_tensors,
    columns_fingerprint,
    default_cache_dir,
    config_fingerprint,
    model_fingerprint,
    model_identity,
    stable_hash,
    write_atomic,
)

import tiny


class Counter:
    """compute() for cached_tensors that counts its calls and returns fresh values each time."""

    def __init__(self, offset: float = 0.0):
        self.calls, self.offset = 0, offset

    def __call__(self):
        self.calls += 1
        return {"chosen": torch.arange(5, dtype=torch.float32) + self.offset,
                "rejected": torch.full((5, 2), -1.0 - self.offset)}


def entries(cache_dir, kind="reference_logps"):
    folder = cache_dir / kind
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_computes_once_then_reuses(tmp_path):
    compute = Counter()
    first = cached_tensors("reference_logps", {"model": "m", "data": "d"}, compute, tmp_path)
    # The order of the key's fields is irrelevant.
    second = cached_tensors("reference_logps", {"data": "d", "model": "m"}, compute, tmp_path)
    assert compute.calls == 1
    assert first.keys() == second.keys() == {"chosen", "rejected"}
    for name in first:
        assert torch.equal(first[name], second[name])
    assert len(entries(tmp_path)) == 1 and entries(tmp_path)[0].endswith(".safetensors")


def test_a_changed_key_or_kind_recomputes(tmp_path):
    compute = Counter()
    cached_tensors("reference_logps", {"model": "m", "data": "d"}, compute, tmp_path)
    other = Counter(offset=10.0)
    values = cached_tensors("reference_logps", {"model": "m", "data": "d2"}, other, tmp_path)
    assert other.calls == 1 and torch.equal(values["chosen"], torch.arange(5, dtype=torch.float32) + 10)
    cached_tensors("margins", {"model": "m", "data": "d"}, compute, tmp_path)
    assert compute.calls == 2
    assert len(entries(tmp_path)) == 2 and len(entries(tmp_path, "margins")) == 1


def test_default_dir_follows_modpo_cache(tmp_path):
    assert default_cache_dir() == tmp_path / "modpo-cache"  # set per test by conftest
    compute = Counter()
    cached_tensors("reference_logps", {"k": 1}, compute)
    cached_tensors("reference_logps", {"k": 1}, compute)
    assert compute.calls == 1 and len(entries(default_cache_dir())) == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_corrupted_entry_is_recomputed_with_a_warning(tmp_path, caplog, damage):
    key = {"model": "m", "data": "d"}
    cached_tensors("reference_logps", key, Counter(), tmp_path)
    path = tmp_path / "reference_logps" / entries(tmp_path)[0]
    raw = path.read_bytes()
    garbage = bytes((7 * i + 3) % 256 for i in range(len(raw)))
    path.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": garbage, "empty": b""}[damage])
    again = Counter(offset=3.0)
    with caplog.at_level(logging.WARNING, logger="modpo.cache"):
        values = cached_tensors("reference_logps", key, again, tmp_path)
    assert again.calls == 1 and torch.equal(values["rejected"], torch.full((5, 2), -4.0))
    assert any("unreadable" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # The recomputed entry replaced the damaged one and is trusted next time.
    third = Counter(offset=99.0)
    assert torch.equal(cached_tensors("reference_logps", key, third, tmp_path)["rejected"], values["rejected"])
    assert third.calls == 0


def test_an_entry_whose_stored_key_differs_is_not_trusted(tmp_path, caplog):
    key_a, key_b = {"model": "a"}, {"model": "b"}
    cached_tensors("reference_logps", key_a, Counter(offset=1.0), tmp_path)
    path_a = tmp_path / "reference_logps" / f"{stable_hash({'kind': 'reference_logps', **key_a})}.safetensors"
    path_b = path_a.with_name(f"{stable_hash({'kind': 'reference_logps', **key_b})}.safetensors")
    assert path_a.exists() and not path_b.exists()
    shutil.copy(path_a, path_b)  # a readable file, but it holds key a's values
    compute_b = Counter(offset=2.0)
    with caplog.at_level(logging.WARNING, logger="modpo.cache"):
        values = cached_tensors("reference_logps", key_b, compute_b, tmp_path)
    assert compute_b.calls == 1 and torch.equal(values["chosen"], torch.arange(5, dtype=torch.float32) + 2)
    assert any("does not match its key" in r.getMessage() for r in caplog.records)


def test_write_atomic_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "sub" / "entry.bin"
    write_atomic(target, lambda tmp: tmp.write_bytes(b"first"))
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry.bin"]

    def fails(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, fails)
    assert target.read_bytes() == b"first"  # the old entry is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry.bin"]
    write_atomic(target, lambda tmp: tmp.write_bytes(b"second"))
    assert target.read_bytes() == b"second" and len(list(target.parent.iterdir())) == 1


# ------------------------------------------------------------------------------------------------ fingerprints

def test_model_fingerprint_is_the_weights():
    tok = tiny.tokenizer()
    model = tiny.model(len(tok), seed=0)
    base = model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model)) == base
    assert model_fingerprint(tiny.model(len(tok), seed=0)) == base  # same seed, same weights
    assert model_fingerprint(tiny.model(len(tok), seed=1)) != base
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) != base


def test_model_fingerprint_sees_every_tensor():
    """Move one element of each parameter and buffer in turn: every change changes the fingerprint."""
    tok = tiny.tokenizer()
    model = tiny.model(len(tok), seed=0)
    model.register_buffer("extra_buffer", torch.zeros(3))
    base = model_fingerprint(model)
    state = model.state_dict()
    assert "extra_buffer" in state and len(state) > 5
    seen = set()
    for name, tensor in state.items():
        with torch.no_grad():
            flat = tensor.view(-1)
            index = flat.numel() - 1
            old = flat[index].clone()
            flat[index] = old + 1e-3
            changed = model_fingerprint(model)
            flat[index] = old
        assert changed != base, name
        seen.add(changed)
    assert model_fingerprint(model) == base  # every change was undone
    assert len(seen) >= len({t.data_ptr() for t in state.values()})  # distinct changes, distinct fingerprints


def test_model_fingerprint_skip():
    from peft import LoraConfig, get_peft_model

    tok = tiny.tokenizer()
    base_model = tiny.model(len(tok), seed=0)
    peft_model = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    skip = lambda name: "lora_" in name
    before = model_fingerprint(peft_model, skip=skip)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(1.0)
    assert model_fingerprint(peft_model, skip=skip) == before
    assert model_fingerprint(peft_model) != model_fingerprint(peft_model, skip=skip)


def test_model_identity_adds_the_config_and_attention_to_the_weights():
    """Settings that change log-probs but no weight (rope_theta, rms_norm_eps, the attention kernel) change the
    identity; the name a model was loaded from and the transformers version do not."""
    tok = tiny.tokenizer()
    model = tiny.model(len(tok), seed=0)
    base = model_identity(model)
    assert base["weights"] == model_fingerprint(model) and base["attention"] == model.config._attn_implementation

    def changed(change):
        other = copy.deepcopy(model)
        change(other)
        assert model_fingerprint(other) == base["weights"]
        return model_identity(other)

    rope = changed(lambda m: setattr(m.config, "rope_parameters", {**m.config.rope_parameters, "rope_theta": 1e6}))
    eps = changed(lambda m: setattr(m.config, "rms_norm_eps", 1e-3))
    eager = changed(lambda m: m.set_attn_implementation("eager" if base["attention"] != "eager" else "sdpa"))
    assert len({stable_hash(i) for i in (base, rope, eps, eager)}) == 4
    assert rope["attention"] == eps["attention"] == base["attention"] != eager["attention"]
    renamed = changed(lambda m: setattr(m.config, "_name_or_path", "/elsewhere/model"))
    assert renamed == base and config_fingerprint(None) is None


def test_margin_models_are_keyed_by_their_config():
    from modpo.margins import ImplicitRewardMargins, RewardModelMargins

    tok = tiny.tokenizer()
    reward = tiny.model(len(tok), seed=0, num_labels=1)
    policy, reference = tiny.model(len(tok), seed=1), tiny.model(len(tok), seed=2)
    keys = [RewardModelMargins(reward, tokenizer=tok).identity(),
            ImplicitRewardMargins(policy, ref_model=reference, tokenizer=tok).identity()]
    for model in (reward, policy, reference):
        model.config.rms_norm_eps = 0.25
    again = [RewardModelMargins(reward, tokenizer=tok).identity(),
             ImplicitRewardMargins(policy, ref_model=reference, tokenizer=tok).identity()]
    assert again[0]["weights"] != keys[0]["weights"]
    assert again[1]["model"] != keys[1]["model"] and again[1]["ref"] != keys[1]["ref"]


def test_model_fingerprint_of_a_model_with_a_scalar_parameter():
    class WithScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            self.logit_scale = torch.nn.Parameter(torch.tensor(1.0))

    model = WithScale()
    before = model_fingerprint(model)
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    assert model_fingerprint(model) != before


def test_columns_fingerprint_follows_content():
    rows = tiny.rows(1500, seed=0)  # more than one 1024-row batch
    data = Dataset.from_list(rows)
    base = columns_fingerprint(data, ["prompt", "chosen"])
    assert columns_fingerprint(Dataset.from_list(rows), ["prompt", "chosen"]) == base
    changed = [dict(r) for r in rows]
    changed[1400]["chosen"] = changed[1400]["chosen"] + " h"
    assert columns_fingerprint(Dataset.from_list(changed), ["prompt", "chosen"]) != base
    other_column = [dict(r) for r in rows]
    other_column[3]["rejected"] = "h h h h h"
    assert columns_fingerprint(Dataset.from_list(other_column), ["prompt", "chosen"]) == base  # not selected
    assert columns_fingerprint(Dataset.from_list(other_column), ["prompt", "rejected"]) != \
        columns_fingerprint(data, ["prompt", "rejected"])
    assert columns_fingerprint(data.select(range(1499)), ["prompt", "chosen"]) != base  # a row fewer
    swapped = rows[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]
    if swapped[0] != rows[0]:
        assert columns_fingerprint(Dataset.from_list(swapped), ["prompt", "chosen"]) != base  # order matters
