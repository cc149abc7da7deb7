"""MODPOTrainer end to end on a tiny Llama: precompute, data errors, LoRA, metrics, accumulation, dropout."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset

from modpo import MODPOConfig, MODPOTrainer
from modpo import precompute as precompute_module, trainer as trainer_module
from modpo.errors import ConfigError, DataError
from modpo.margins import CallableMargins, length_penalty

import tiny


def config(tmp_path, **kwargs) -> MODPOConfig:
    settings = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no", seed=0,
                    max_length=32, per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=1,
                    lr_scheduler_type="constant", disable_tqdm=True)
    settings.update(kwargs)
    return MODPOConfig(**settings)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


@pytest.fixture
def tok():
    return tiny.tokenizer()


# ------------------------------------------------------------------------------------------------ precompute

def test_reference_is_precomputed_once_across_weight_vectors(tmp_path, tok, monkeypatch):
    calls = []
    original = precompute_module.batched_sequence_logps

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return original(*args, **kwargs)

    monkeypatch.setattr(precompute_module, "batched_sequence_logps", counting)
    model = tiny.model(len(tok), seed=1)
    data = Dataset.from_list(tiny.rows(6, seed=1, num_margins=1))
    first = MODPOTrainer(copy.deepcopy(model), args=config(tmp_path, weights=[0.6, 0.4]), train_dataset=data,
                         processing_class=tok)
    assert len(calls) == 2  # chosen and rejected
    second = MODPOTrainer(copy.deepcopy(model), args=config(tmp_path, weights=[0.8, 0.2]), train_dataset=data,
                          processing_class=tok)
    assert len(calls) == 2, "the second weight vector recomputed the reference"
    entries = list((tmp_path / "modpo-cache" / "reference_logps").iterdir())
    assert len(entries) == 1
    for column in ("ref_chosen_logps", "ref_rejected_logps", "chosen_margins"):
        assert first.train_dataset[column] == second.train_dataset[column]
    # The precomputed values are the model's own log-probs (no ref_model: the policy at init is the reference).
    expected = original(model, first.train_dataset["prompt_ids"], first.train_dataset["chosen_ids"], tok.pad_token_id)
    assert torch.allclose(torch.tensor(first.train_dataset["ref_chosen_logps"]), expected, atol=1e-6)
    # Different data: a new entry.
    MODPOTrainer(copy.deepcopy(model), args=config(tmp_path, weights=[0.8, 0.2]),
                 train_dataset=Dataset.from_list(tiny.rows(6, seed=2, num_margins=1)), processing_class=tok)
    assert len(calls) == 4


def test_missing_margins_with_several_objectives(tmp_path, tok):
    data = Dataset.from_list(tiny.rows(4, seed=3))
    with pytest.raises(ConfigError) as error:
        MODPOTrainer(tiny.model(len(tok)), args=config(tmp_path, weights=[0.5, 0.5]), train_dataset=data,
                     processing_class=tok)
    assert "margin" in str(error.value) and "train_dataset" in str(error.value)


def test_margins_from_columns_and_sources_at_once(tmp_path, tok):
    data = Dataset.from_list(tiny.rows(4, seed=3, num_margins=1))
    with pytest.raises(ConfigError, match="both"):
        MODPOTrainer(tiny.model(len(tok)), args=config(tmp_path, weights=[0.5, 0.5]), train_dataset=data,
                     processing_class=tok, margin_rewards=[CallableMargins(length_penalty)])


def test_margin_sources_with_the_wrong_count(tmp_path, tok):
    data = Dataset.from_list(tiny.rows(4, seed=3))
    with pytest.raises(ConfigError, match="1 objectives"):
        MODPOTrainer(tiny.model(len(tok)), args=config(tmp_path, weights=[0.5, 0.3, 0.2]), train_dataset=data,
                     processing_class=tok, margin_rewards=[CallableMargins(length_penalty)])


def test_margin_sources_fill_the_margin_columns(tmp_path, tok):
    rows = tiny.rows(4, seed=3)
    trainer = MODPOTrainer(tiny.model(len(tok)), args=config(tmp_path, weights=[0.5, 0.5]),
                           train_dataset=Dataset.from_list(rows), processing_class=tok,
                           margin_rewards=[CallableMargins(length_penalty)])
    assert trainer.train_dataset["chosen_margins"] == [[-float(len(r["chosen"].split()))] for r in rows]


def test_margin_columns_of_the_wrong_length(tmp_path, tok):
    data = Dataset.from_list(tiny.rows(4, seed=4, num_margins=1))
    with pytest.raises(DataError) as error:
        MODPOTrainer(tiny.model(len(tok)), args=config(tmp_path, weights=[0.5, 0.3, 0.2]), train_dataset=data,
                     processing_class=tok, data_names=("prefs.jsonl", None))
    message = str(error.value)
    assert message.startswith("prefs.jsonl[0], field 'chosen_margins'")
    assert "expected 2" in message


def test_tokenizer_without_pad_token(tmp_path, tok):
    tok.pad_token = None
    with pytest.raises(ConfigError, match="pad"):
        MODPOTrainer(tiny.model(len(tok)), args=config(tmp_path), train_dataset=Dataset.from_list(tiny.rows(2)),
                     processing_class=tok)


class Stop(Exception):
    pass


def test_precompute_models_run_on_the_training_device(tmp_path, tok, monkeypatch):
    """Margin models and the reference are moved to args.device to score, and back to the CPU afterwards
    (the device is a name only here: the recorded `.to` calls do not move anything)."""
    from modpo.margins import ImplicitRewardMargins

    class OnDevice(MODPOConfig):
        @property
        def device(self):
            return torch.device("cuda", 1)

    events = []
    base = tiny.model(len(tok), seed=30)
    policy, margin_policy, margin_reference = (tiny.perturbed(base, seed=s) for s in (31, 32, 33))
    reference = tiny.spy_placement(base, events, "reference")  # copies first: a copy would carry the spy
    source = ImplicitRewardMargins(tiny.spy_placement(margin_policy, events, "margin_policy"),
                                   ref_model=tiny.spy_placement(margin_reference, events, "margin_reference"),
                                   tokenizer=tok, batch_size=2)

    def stop(*args):
        raise Stop

    monkeypatch.setattr(trainer_module, "chunked_head_agrees_on", stop)
    args = OnDevice(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_length=32, weights=[0.5, 0.5],
                    disable_tqdm=True)
    with pytest.raises(Stop):  # stop before the Trainer places the policy on the (absent) device
        MODPOTrainer(policy, ref_model=reference, args=args,
                     train_dataset=Dataset.from_list(tiny.rows(3, seed=33)), processing_class=tok,
                     margin_rewards=[source])
    for label in ("reference", "margin_policy", "margin_reference"):
        assert tiny.placement_of(events, label) == ["to cuda:1", "forward", "to cpu"], label
    # The policy as reference stays on the device: training runs it there.
    events.clear()
    with pytest.raises(Stop):
        MODPOTrainer(tiny.spy_placement(policy, events, "policy"), args=args, processing_class=tok,
                     train_dataset=Dataset.from_list(tiny.rows(3, seed=33)), margin_rewards=[source])
    assert tiny.placement_of(events, "policy") == ["to cuda:1", "forward"]


def test_a_head_the_chunked_path_cannot_reproduce_turns_chunking_off(tmp_path, tok, caplog):
    data = Dataset.from_list(tiny.rows(4, seed=34))
    with caplog.at_level("WARNING", logger="modpo.logps"):
        capped = MODPOTrainer(tiny.with_forward(tiny.soft_capped, seed=35), args=config(tmp_path), train_dataset=data,
                              processing_class=tok)
    assert capped.args.chunked_logps is False
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "SoftCapped" in warnings[0]
    # The reference log-probs (the policy as reference) are those of the model's full logits.
    reference = tiny.with_forward(tiny.soft_capped, seed=35)
    expected = batched_sequence_logps_full(reference, capped.train_dataset, tok.pad_token_id)
    assert torch.allclose(torch.tensor(capped.train_dataset["ref_chosen_logps"]), expected, atol=1e-5)
    plain = MODPOTrainer(tiny.model(len(tok), seed=35), args=config(tmp_path), train_dataset=data, processing_class=tok)
    assert plain.args.chunked_logps is True


def test_construction_leaves_the_config_as_given(tmp_path, tok):
    """What the start-up checks decide (chunked head off for a soft-capped model, DDP's unused-parameter search
    off) is in `trainer.settings` and the trainer's own arguments; the caller's config is not changed."""
    data = Dataset.from_list(tiny.rows(4, seed=36))
    for model, chunked in ((tiny.with_forward(tiny.soft_capped, seed=37), False), (tiny.model(len(tok), seed=37), True)):
        args = config(tmp_path, padding_free=True, weight_sampling="dirichlet", weights=[0.5, 0.5])
        before = copy.deepcopy(args.to_dict())
        trainer = MODPOTrainer(model, args=args, train_dataset=data.map(lambda r: {"chosen_margins": [0.0],
                               "rejected_margins": [1.0]}), processing_class=tok)
        assert args.to_dict() == before
        assert trainer.args is not args
        assert trainer.settings.chunked_logps is chunked and trainer.args.chunked_logps is chunked
        assert trainer.settings.ddp_find_unused_parameters is (False if chunked else None)
        reasons = trainer.settings.record()["reasons"]
        assert ("chunked_logps" in reasons) is (not chunked)
        trainer.train()
        assert args.to_dict() == before


def batched_sequence_logps_full(model, tokenized, pad_token_id):
    from modpo.logps import batched_sequence_logps

    return batched_sequence_logps(model, tokenized["prompt_ids"], tokenized["chosen_ids"], pad_token_id, chunked=False)


# ------------------------------------------------------------------------------------------------ training

def test_lora_training_changes_only_lora_parameters(tmp_path, tok):
    from peft import LoraConfig

    data = Dataset.from_list(tiny.rows(8, seed=5))
    trainer = MODPOTrainer(tiny.model(len(tok), seed=5), args=config(tmp_path, max_steps=3, learning_rate=5e-2),
                           train_dataset=data, processing_class=tok,
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    assert changed, "training changed nothing"
    assert changed <= trainable, changed - trainable
    assert any("lora_B" in name for name in changed)


def test_lora_initialisation_follows_the_seed(tmp_path, tok):
    from peft import LoraConfig

    data = Dataset.from_list(tiny.rows(4, seed=5))
    base = tiny.model(len(tok), seed=5)

    def adapters(seed: int, noise: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(noise)  # whatever the global random state was before
        trainer = MODPOTrainer(copy.deepcopy(base), args=config(tmp_path, seed=seed), train_dataset=data,
                               processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n}

    first, again, other = adapters(0, noise=1), adapters(0, noise=2), adapters(1, noise=1)
    assert first and all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)


def test_logged_metrics_and_evaluate(tmp_path, tok):
    rows = tiny.rows(4, seed=6, num_margins=1)
    weights = [0.7, 0.3]
    data = Dataset.from_list(rows)
    trainer = MODPOTrainer(tiny.model(len(tok), seed=6), args=config(tmp_path, weights=weights, beta=0.2,
                                                                     max_steps=2, logging_steps=1, learning_rate=1e-2),
                           train_dataset=data, eval_dataset=data, processing_class=tok)
    # Before training the policy is its own reference: z = -w1 (m_c - m_r) / w0 for each pair.
    differences = [r["chosen_margins"][0] - r["rejected_margins"][0] for r in rows]
    at_init = sum(-log_sigmoid(-weights[1] * d / weights[0]) for d in differences) / len(rows)
    metrics = trainer.evaluate()
    assert abs(metrics["eval_loss"] - at_init) < 1e-5, (metrics["eval_loss"], at_init)
    assert abs(metrics["eval_rewards/margins"]) < 1e-5
    assert abs(metrics["eval_margins/objective_1"] - sum(differences) / len(rows)) < 1e-6

    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/chosen",
                    "margins/objective_1"):
            assert key in entry and math.isfinite(entry[key]), (key, entry)
        assert 0.0 <= entry["rewards/accuracies"] <= 1.0
        assert abs(entry["margins/objective_1"] - sum(differences) / len(rows)) < 1e-6  # the whole data is one batch
    assert abs(logged[0]["loss"] - at_init) < 1e-5  # step 1 is computed before any update
    assert abs(logged[0]["rewards/margins"]) < 1e-5
    assert logged[1]["rewards/margins"] > 0  # one step of MODPO moves chosen above rejected
    after = trainer.evaluate()
    assert after["eval_loss"] < metrics["eval_loss"]


def test_non_finite_loss_names_the_rows(tmp_path, tok):
    trainer = MODPOTrainer(tiny.model(len(tok)), args=config(tmp_path), train_dataset=Dataset.from_list(tiny.rows(4)),
                           processing_class=tok)
    features = [trainer.train_dataset[i] for i in (2, 0)]
    features[1] = {**features[1], "ref_chosen_logps": float("nan")}
    batch = trainer.data_collator(features)
    with pytest.raises(FloatingPointError, match=r"rows \[3, 1\]"):
        trainer.compute_loss(trainer.model, batch)


def test_gradient_accumulation_matches_the_full_batch(tmp_path, tok):
    data = Dataset.from_list(tiny.rows(4, seed=7, num_margins=1))
    model = tiny.model(len(tok), seed=7)
    common = dict(weights=[0.6, 0.4], optim="sgd", learning_rate=0.5, max_steps=1, weight_decay=0.0,
                  max_grad_norm=0.0, warmup_steps=0)
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        args = config(tmp_path / f"{batch_size}x{accumulation}", per_device_train_batch_size=batch_size,
                      gradient_accumulation_steps=accumulation, **common)
        trainer = MODPOTrainer(copy.deepcopy(model), args=args, train_dataset=data, processing_class=tok)
        trainer.train()
        assert trainer.state.global_step == 1
        results.append({name: p.detach().clone() for name, p in trainer.model.named_parameters()})
    full, accumulated = results
    moved = max((full[name] - p).abs().max().item() for name, p in model.named_parameters())
    assert moved > 1e-3, "the step did not move the parameters: the comparison would be vacuous"
    for name in full:
        assert torch.allclose(full[name], accumulated[name], atol=1e-5, rtol=0), name


# ------------------------------------------------------------------------------------------------ dropout

def test_dropout_is_disabled_after_init(tmp_path, tok):
    from peft import LoraConfig

    trainer = MODPOTrainer(tiny.model(len(tok), seed=8), args=config(tmp_path),
                           train_dataset=Dataset.from_list(tiny.rows(2)), processing_class=tok,
                           peft_config=LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]))
    dropouts = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # non-zero adapters, so LoRA dropout would show in the output
    trainer.model.train()
    ids = torch.tensor([[1, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(trainer.model(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


def test_attention_dropout_is_disabled_after_init(tmp_path, tok):
    from transformers import LlamaForCausalLM

    base = tiny.model(len(tok), seed=9)
    base.config.attention_dropout = 0.5
    torch.manual_seed(9)
    model = LlamaForCausalLM(base.config)
    trainer = MODPOTrainer(model, args=config(tmp_path), train_dataset=Dataset.from_list(tiny.rows(2)),
                           processing_class=tok)
    trainer.model.train()
    ids = torch.tensor([[1, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(trainer.model(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("kwargs, words", [
    ({"weights": [0.5, 0.3]}, ["sum to 0.8", "0.625"]),
    ({"weights": [2.0]}, ["sum to 2", "[1.0]"]),
    ({"weights": [0.0, 1.0]}, ["weights[0]"]),
    ({"weights": [1.2, -0.2]}, ["negative"]),
    ({"beta": 0.0}, ["beta"]),
    ({"beta": -0.1}, ["beta"]),
    ({"beta": float("inf")}, ["beta"]),
    ({"loss_type": "ipo"}, ["loss_type"]),
    ({"label_smoothing": 0.5}, ["label_smoothing"]),
    ({"max_length": 1}, ["max_length"]),
])
def test_config_refuses_bad_values(tmp_path, kwargs, words):
    with pytest.raises(ValueError) as error:
        MODPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_config_accepts_the_simplex():
    args = MODPOConfig(output_dir="unused", report_to=[], use_cpu=True, weights=[0.2, 0.3, 0.5], beta=0.05)
    assert args.weights == [0.2, 0.3, 0.5] and args.remove_unused_columns is False
