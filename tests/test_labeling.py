"""On-policy pairs labelled by scorers (`modpo.labeling`) and the recipe stage that makes them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

import tiny
from modpo.errors import ConfigError
from modpo.labeling import LabelConfig, bradley_terry, check_label_config, correlations, label_statistics, run_label
from modpo.recipes import load_recipe, run_recipe


def test_bradley_terry_draws_at_the_stated_probability():
    a, b = np.zeros(20000), np.full(20000, -0.1)
    p, first = bradley_terry(a, b, tau=0.1, seed=3)
    assert p == pytest.approx(np.full(20000, 1 / (1 + math.exp(-1))))
    se = math.sqrt(p[0] * (1 - p[0]) / len(p))
    assert abs(first.mean() - p[0]) < 4 * se
    assert (bradley_terry(a, b, 0.1, 3)[1] == first).all() and (bradley_terry(a, b, 0.1, 4)[1] != first).any()
    assert bradley_terry(np.array([5.0]), np.array([0.0]), tau=1e-3, seed=0)[1].all()  # a cold label is the sign


def test_correlations_agree_with_scipy_including_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 300).astype(float)  # many ties
    y = -0.5 * x + rng.normal(size=300)
    c = correlations(x, y)
    assert c["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert c["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert c["n"] == 300


def test_label_statistics_by_hand():
    scores = {"s": np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0]), "t": np.array([0.0, 1.0, 1.0, 0.0, 3.0, 1.0])}
    first = np.array([True, True, False])  # agrees, disagrees, tie
    result = label_statistics(scores, {"s": {"temperature": 0.5, "p": np.array([0.9, 0.1, 0.5]),
                                             "first_preferred": first}})
    label = result["labels"]["s"]
    assert label["ties"] == 1 and label["pairs"] == 3 and label["agreement_with_sign"] == 0.5
    assert label["mean_p_chosen"] == pytest.approx((0.9 + 0.1 + 0.5) / 3)
    within = result["correlations"]["s vs t"]["within_pair_differences"]
    assert within["pearson"] == pytest.approx(np.corrcoef([1, -1, 0], [-1, 1, 2])[0, 1])
    assert result["scorers"]["s"]["mean"] == pytest.approx(1.0)


@pytest.fixture
def model_dir(tmp_path):
    tok = tiny.tokenizer()
    return tiny.save(tiny.model(len(tok), seed=0), tok, tmp_path / "base")


def label_config(tmp_path, model_dir, **changes) -> dict:
    prompts = tiny.write_jsonl(tmp_path / "prompts.jsonl", tiny.rows(6, seed=1))
    config = {"model": model_dir, "output_dir": str(tmp_path / "pairs"), "prompts": prompts,
              "samples_per_prompt": 4, "sampling": {"max_new_tokens": 6, "temperature": 1.0, "seed": 0},
              "scorers": {"brevity": {"type": "length_penalty"},
                          "chars": {"type": "scorer", "callable": "builtins:len", "name": "chars"}},
              "labels": {"brevity": {"temperature": 1e-3}}}
    return {**config, **changes}


def test_label_samples_scores_pairs_and_reuses(tmp_path, model_dir):
    cfg = LabelConfig(**label_config(tmp_path, model_dir))
    said = []
    out = run_label(cfg, say=said.append)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    distinct = len({r["prompt"] for r in tiny.rows(6, seed=1)})
    assert len(samples) == 4 * distinct
    for s in samples:
        assert s["scores"]["brevity"] == -len(s["response"].split()) and s["scores"]["chars"] == len(s["response"])
    pairs = [json.loads(line) for line in (out / "pairs_brevity.jsonl").read_text().splitlines()]
    record = json.loads((out / "labels.json").read_text())
    kept = [(a, b) for a, b in zip(samples[0::2], samples[1::2])
            if a["response"].strip() and b["response"].strip() and a["response"] != b["response"]]
    assert len(pairs) == len(kept) and sum(record["pairs_left_out"].values()) == 2 * distinct - len(kept)
    for (a, b), pair in zip(kept, pairs):
        assert pair["prompt"] == a["prompt"] and {pair["chosen"], pair["rejected"]} == {a["response"], b["response"]}
        if a["scores"]["brevity"] != b["scores"]["brevity"]:  # at tau -> 0 the label is the scorer's sign
            assert len(pair["chosen"].split()) < len(pair["rejected"].split())
    assert record["labels"]["brevity"]["agreement_with_sign"] in (1.0,) or math.isnan(
        record["labels"]["brevity"]["agreement_with_sign"])
    brevity = np.array([s["scores"]["brevity"] for s in samples])
    chars = np.array([s["scores"]["chars"] for s in samples])
    assert record["correlations"]["brevity vs chars"]["samples"]["pearson"] == pytest.approx(
        np.corrcoef(brevity, chars)[0, 1])
    mtime = (out / "samples.jsonl").stat().st_mtime_ns
    run_label(cfg, say=said.append)
    assert said[-1].endswith("is up to date") and (out / "samples.jsonl").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("changes, message", [
    ({"samples_per_prompt": 3}, "give an even number >= 2"),
    ({"labels": {"tone": {"temperature": 1}}}, "labels.tone: no scorer of that name"),
    ({"labels": {"brevity": {"temperature": 0}}}, "labels.brevity.temperature must be > 0"),
    ({"labels": {"brevity": {"tau": 1}}}, "labels.brevity: give {temperature: tau}"),
    ({"sampling": {"max_tokens": 4}}, "sampling: unknown key(s) max_tokens"),
    ({"scorers": {"x": {"type": "scorer", "callable": "not_installed_mod:f"}}}, "pip install not_installed_mod"),
])
def test_a_bad_label_config_is_refused_before_anything_loads(tmp_path, changes, message):
    with pytest.raises(ConfigError) as err:
        check_label_config(LabelConfig(**label_config(tmp_path, "no-model-needed", **changes)), "stages[0]")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_recipe_trains_on_the_pairs_its_label_stage_writes(tmp_path, model_dir):
    label = label_config(tmp_path, model_dir, output_dir="${root}/pairs")
    training = {"max_steps": 1, "per_device_train_batch_size": 2, "use_cpu": True, "report_to": [],
                "save_strategy": "no", "disable_tqdm": True, "max_length": 32}
    dpo = {"model": model_dir, "output_dir": "${root}/dpo", "train_data": "${root}/pairs/pairs_brevity.jsonl",
           "training": training}
    path = tiny.write_yaml(tmp_path / "r.yaml", {"variables": {"root": str(tmp_path / "run")}, "stages": [
        {"command": "label", "config": label}, {"command": "dpo", "config": dpo}]})
    load_recipe(path, check_data=True)  # the pairs do not exist yet: an earlier stage writes them
    outputs = run_recipe(path)
    assert outputs == [str(tmp_path / "run" / "pairs"), str(tmp_path / "run" / "dpo")]
    assert json.loads((tmp_path / "run" / "dpo" / "modpo_run.json").read_text())["stage"] == "dpo"


def test_modpo_label_on_the_command_line(capsys, tmp_path, model_dir):
    config = tiny.write_yaml(tmp_path / "label.yaml", label_config(tmp_path, model_dir))
    code, out, err = tiny.run_cli(capsys, "label", "--config", config, "labels.brevity.temperature=0.5")
    assert code == 0 and f"saved to {tmp_path / 'pairs'}" in out
    assert json.loads((tmp_path / "pairs" / "labels.json").read_text())["labels"]["brevity"]["temperature"] == 0.5
    code, out, err = tiny.run_cli(capsys, "label", "--config", config, "samples_per_prompt=5")
    assert code == 2 and err.count("\n") == 1 and "samples_per_prompt = 5: give an even number" in err
