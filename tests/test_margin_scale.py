"""Margin scales: statistics of m(y_w) - m(y_l), the warning for weights that cannot balance, and standardize."""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
from pathlib import Path

import pytest
import torch
from datasets import Dataset

import tiny
from modpo import CallableMargins, ColumnMargins, ImplicitRewardMargins, MODPOConfig, MODPOTrainer, length_penalty
from modpo.logps import batched_sequence_logps
from modpo.margin_scale import check_scale, difference_statistics, measure, weight_warnings
from modpo.margin_specs import margin_sources
from modpo.models import tiny_causal_lm, word_tokenizer
from test_optimum import K0, PROMPTS, R1, R2, RESPONSES, bradley_terry_rows

ULTRAFEEDBACK = Path(__file__).resolve().parents[2] / "shared" / "data" / "ultrafeedback_binarized_train1000.jsonl"


def config(tmp_path, **kwargs) -> MODPOConfig:
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no", seed=0,
                per_device_train_batch_size=4, cache_dir=str(tmp_path / "cache"))
    return MODPOConfig(**{**base, **kwargs})


def test_statistics_equal_a_direct_computation():
    chosen = torch.tensor([[1.0, 10.0], [2.0, -4.0], [0.5, 3.0], [4.0, 0.0], [-1.0, 7.0]])
    rejected = torch.tensor([[0.0, 2.0], [3.0, 1.0], [0.5, -3.0], [1.0, 2.0], [1.0, 1.0]])
    stats = difference_statistics(chosen, rejected)
    for k, got in enumerate(stats):
        d = [c - r for c, r in zip(chosen[:, k].tolist(), rejected[:, k].tolist())]
        assert got["pairs"] == 5
        assert got["mean"] == pytest.approx(statistics.fmean(d))
        assert got["std"] == pytest.approx(statistics.pstdev(d))
        assert got["median"] == pytest.approx(statistics.median(d))
        assert got["median_abs"] == pytest.approx(statistics.median(abs(x) for x in d))
        assert (got["min"], got["max"]) == (min(d), max(d))
        ordered = sorted(d)  # linear interpolation between order statistics, as torch.quantile
        assert got["q25"] == pytest.approx(ordered[1]) and got["q75"] == pytest.approx(ordered[3])


def test_scale_settings():
    assert check_scale("standardize") == "standardize" and check_scale(2) == 2.0
    for bad in ("unit", 0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="scale"):
            check_scale(bad)
    chosen, rejected = torch.tensor([[3.0], [1.0], [6.0]]), torch.tensor([[1.0], [2.0], [2.0]])
    doubled_c, doubled_r, scales = measure(chosen, rejected, ["m"], [2.0])
    assert torch.equal(doubled_c, 2 * chosen) and scales.factors == [2.0]
    _, _, standard = measure(chosen, rejected, ["m"], ["standardize"])
    assert standard.scaled[0]["std"] == pytest.approx(1.0)
    assert standard.factors[0] == pytest.approx(1 / statistics.pstdev([2.0, -1.0, 4.0]))
    with pytest.raises(ValueError, match="zero spread"):
        measure(chosen, chosen, ["m"], ["standardize"])
    # robust: divided by the median |difference|, which one outlying pair does not move as it moves the std
    outlier_c, outlier_r = torch.tensor([[3.0], [1.0], [6.0], [600.0]]), torch.tensor([[1.0], [2.0], [2.0], [0.0]])
    _, _, robust = measure(outlier_c, outlier_r, ["m"], ["robust"])
    assert robust.scaled[0]["median_abs"] == pytest.approx(1.0)
    assert robust.factors[0] == pytest.approx(1 / statistics.median([2.0, 1.0, 4.0, 600.0]))
    _, _, standard = measure(outlier_c, outlier_r, ["m"], ["standardize"])
    assert standard.scaled[0]["median_abs"] < 0.02  # the std the outlier inflates shrinks the typical pair


@pytest.mark.skipif(not ULTRAFEEDBACK.exists(), reason="../shared/data is absent")
def test_a_raw_length_penalty_on_real_responses_is_warned_about(tmp_path, caplog):
    rows = [json.loads(line) for line in ULTRAFEEDBACK.read_text().splitlines()[:12]]
    data = Dataset.from_list([{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows])
    tok = tiny.bpe_tokenizer("chatml")
    with caplog.at_level(logging.WARNING, logger="modpo.trainer"):
        trainer = MODPOTrainer(tiny.model(len(tok)), args=config(tmp_path, weights=[0.7, 0.3], max_length=2048),
                               train_dataset=data, processing_class=tok, margin_rewards=[CallableMargins(length_penalty)])
    words = [length_penalty(r["prompt"], r["chosen"]) - length_penalty(r["prompt"], r["rejected"]) for r in rows]
    assert trainer.margin_scales.raw[0]["median_abs"] == pytest.approx(statistics.median(map(abs, words)))
    warnings = [r.getMessage() for r in caplog.records if "margin objective 1" in r.getMessage()]
    assert len(warnings) == 1 and "length_penalty" in warnings[0] and "decides nearly every pair" in warnings[0]
    assert "scale: standardize" in warnings[0]

    caplog.clear()  # standardized, the same margin is on the preference scale: no warning
    with caplog.at_level(logging.WARNING, logger="modpo.trainer"):
        standardized = MODPOTrainer(tiny.model(len(tok)), args=config(tmp_path, weights=[0.7, 0.3], max_length=2048),
                                    train_dataset=data, processing_class=tok,
                                    margin_rewards=[CallableMargins(length_penalty).scaled("standardize")])
    assert not [r for r in caplog.records if "margin objective" in r.getMessage()]
    differences = torch.tensor(standardized.train_dataset["chosen_margins"]) - torch.tensor(
        standardized.train_dataset["rejected_margins"])
    assert differences.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)


def test_an_implicit_reward_trained_with_the_same_beta_is_not_warned_about(tmp_path, caplog):
    tok = tiny.tokenizer()
    sft = tiny.model(len(tok), seed=3)
    data = Dataset.from_list(tiny.rows(16, seed=8))
    dpo = MODPOTrainer(copy.deepcopy(sft), args=config(tmp_path, beta=0.1, max_steps=20, learning_rate=1e-2),
                       train_dataset=data, processing_class=tok)
    dpo.train()
    margin = ImplicitRewardMargins(dpo.model, ref_model=sft, tokenizer=tok, beta=0.1)
    with caplog.at_level(logging.WARNING, logger="modpo.trainer"):
        trainer = MODPOTrainer(copy.deepcopy(sft), args=config(tmp_path, weights=[0.5, 0.5], beta=0.1),
                               train_dataset=Dataset.from_list(tiny.rows(16, seed=9)), processing_class=tok,
                               margin_rewards=[margin])
    assert 0.01 < trainer.margin_scales.raw[0]["median_abs"] < 10  # a DPO-scale reward: O(1) logits or below
    assert not [r for r in caplog.records if "margin objective" in r.getMessage()]


def test_standardize_reaches_the_optimum_of_the_rescaled_rewards(tmp_path):
    """The closed-form bandit of test_optimum with margins standardized: beta log(pi/pi_ref) = w_0 r_0 +
    w_1 r_1 / sigma_1 + w_2 r_2 / sigma_2 up to a per-prompt constant, sigma_k the std of r_k(y_w) - r_k(y_l)."""
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
             "c1": r["chosen_margins"][0], "c2": r["chosen_margins"][1],
             "r1": r["rejected_margins"][0], "r2": r["rejected_margins"][1]} for r in bradley_terry_rows()]
    sigma = [statistics.pstdev([row[f"c{k}"] - row[f"r{k}"] for row in rows]) for k in (1, 2)]
    tokenizer = word_tokenizer(PROMPTS + RESPONSES)
    model = tiny_causal_lm(len(tokenizer), hidden_size=32, layers=1, heads=2, seed=0)
    weights, beta = [0.5, 0.3, 0.2], 0.5
    source = ColumnMargins(["c1", "c2"], ["r1", "r2"]).scaled("standardize")
    args = config(tmp_path, weights=weights, beta=beta, per_device_train_batch_size=len(rows), max_steps=400,
                  learning_rate=2e-2, lr_scheduler_type="constant", max_length=8, append_eos=False)
    trainer = MODPOTrainer(model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                           margin_rewards=[source])
    assert trainer.margin_scales.factors == pytest.approx([1 / s for s in sigma])
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS for _ in RESPONSES]
    response_ids = [tokenizer(r)["input_ids"] for _ in PROMPTS for r in RESPONSES]
    reference = batched_sequence_logps(model, prompt_ids, response_ids, tokenizer.pad_token_id)
    trainer.train()
    learned = (beta * (batched_sequence_logps(trainer.model, prompt_ids, response_ids, tokenizer.pad_token_id)
                       - reference)).reshape(len(PROMPTS), len(RESPONSES)).double()
    target = torch.tensor([[weights[0] * math.log(K0[p][y]) + weights[1] * R1[p][y] / sigma[0]
                            + weights[2] * R2[p][y] / sigma[1] for y in range(len(RESPONSES))] for p in PROMPTS],
                          dtype=torch.float64)
    centred = lambda t: t - t.mean(dim=1, keepdim=True)
    assert torch.allclose(centred(learned), centred(target), atol=5e-3), (centred(learned), centred(target))


def test_a_bradley_terry_margin_is_not_said_to_dwarf_sharp_preferences():
    """An implicit reward is on the preference objective's BT-logit scale by construction: large differences mean
    sharp labels, on both objectives, so only the other direction (vanishing) is warned about."""
    chosen, rejected = torch.tensor([[40.0], [-30.0], [55.0]]), torch.tensor([[0.0], [0.0], [0.0]])
    for calibrated, warned in ((True, 0), (False, 1)):
        _, _, scales = measure(chosen, rejected, ["m"], ["none"], bradley_terry=[calibrated])
        assert len(weight_warnings([0.1, 0.9], scales)) == warned
    _, _, tiny_margin = measure(chosen * 1e-4, rejected, ["m"], ["none"], bradley_terry=[True])
    assert "almost no effect" in weight_warnings([0.9, 0.1], tiny_margin)[0]


def test_yaml_sources_take_a_scale_and_the_length_unit():
    tok = tiny.tokenizer()
    plain, per100, standardized = margin_sources([{"type": "length_penalty"}, {"type": "length_penalty", "per": 100},
                                                  {"type": "length_penalty", "scale": "standardize"}], tok, 32)
    assert (plain.scale, standardized.scale) == ("none", "standardize")
    assert per100.fn("p", "a b c d") == pytest.approx(-0.04) and plain.fn("p", "a b c d") == -4.0
    assert plain.identity() != per100.identity()
    with pytest.raises(Exception, match="scale"):
        margin_sources([{"type": "length_penalty", "scale": "unit"}], tok, 32)
