"""The throughput benchmark's CPU mode, run in-process: both trainers train, and the numbers add up.

Nothing here asserts on speed; only on the bookkeeping (token counts, ratios, MFU arithmetic).
"""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recount(rows: list[dict]) -> int:
    """Non-pad tokens of one step, from the text: every word is one token, plus one eos per sequence."""
    return sum(2 * len(r["prompt"].split()) + len(r["chosen"].split()) + len(r["rejected"].split()) + 2 for r in rows)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    throughput = load("throughput")
    out = tmp_path_factory.mktemp("bench") / "results.json"
    returned = throughput.main(["--cpu", "--steps", "4", "--warmup", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert not list(out.parent.glob(".*.tmp")), "the temporary file of the atomic write was left behind"
    return returned, written


def test_both_trainers_ran(report):
    returned, written = report
    assert written["ok"] is True
    assert set(written["results"]) == {"modpo", "trl"}
    for side, result in written["results"].items():
        assert "error" not in result, result.get("error")
        assert result["tokens_per_s"] > 0
        assert result["median_step_s"] > 0
        assert 0 < result["mfu"]
        assert len(result["step_times_s"]) == 4
        assert result["settings"]["attn_implementation"] == "sdpa"
    assert written["results"]["modpo"]["settings"]["weights"] == [0.6, 0.4]
    assert written["results"]["trl"]["settings"]["precompute_ref_log_probs"] is True
    # the returned report is what was written
    assert json.loads(json.dumps(returned)) == written


def test_token_counts_match_the_synthetic_data(report):
    _, written = report
    bench_common = load("bench_common")
    cfg = written["config"]
    pairs = cfg["pairs_per_step"]
    rows = bench_common.synthetic_pairs(cfg["steps"] * pairs, cfg["prompt_len"], cfg["response_len"],
                                        cfg["vocab_size"], seed=cfg["seed"])
    expected = [recount(rows[i : i + pairs]) for i in range(0, len(rows), pairs)]
    assert written["expected_tokens_per_step"] == expected
    assert written["expected_tokens_total"] == sum(expected)
    timed = expected[cfg["warmup"]:]
    for result in written["results"].values():
        assert result["tokens_per_step"] == expected  # counted from each trainer's own batches
        assert result["tokens_match_expected"] is True
        assert result["tokens_per_step_timed_mean"] == pytest.approx(sum(timed) / len(timed))


def test_rates_and_ratios_are_the_measured_numbers(report):
    _, written = report
    cfg = written["config"]
    for result in written["results"].values():
        timed = result["step_times_s"][cfg["warmup"]:]
        assert result["median_step_s"] == pytest.approx(statistics.median(timed))
        assert result["tokens_per_s"] == pytest.approx(result["tokens_per_step_timed_mean"] / result["median_step_s"])
        flops = 6 * cfg["n_flops_params"] * result["tokens_per_s"]
        assert result["mfu"] == pytest.approx(flops / (cfg["peak_tflops"] * 1e12))
    modpo, trl = written["results"]["modpo"], written["results"]["trl"]
    ratios = written["ratios"]
    assert ratios["tokens_per_s"] == pytest.approx(modpo["tokens_per_s"] / trl["tokens_per_s"])
    assert ratios["mfu"] == pytest.approx(modpo["mfu"] / trl["mfu"])
    assert ratios["median_step_s"] == pytest.approx(modpo["median_step_s"] / trl["median_step_s"])
    assert ratios["peak_mem"] is None  # CPU: process-wide RSS gives no per-trainer ratio


def test_n_counts_non_embedding_plus_head():
    bench_common = load("bench_common")
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        counts = bench_common.flops_params(Qwen2ForCausalLM(bench_common.qwen2_config("0.5b")))
    assert counts["tied_embeddings"]
    assert counts["params_lm_head"] == 151936 * 896
    assert counts["n_flops_params"] == counts["params_total"]  # tied: the one matrix counts once, as the head
    assert 490e6 < counts["params_total"] < 500e6  # Qwen2.5-0.5B: 494M


def test_modpo_set_values_and_bad_options():
    throughput = load("throughput")
    assert throughput.parse_value("true") is True
    assert throughput.parse_value("False") is False
    assert throughput.parse_value("3") == 3
    assert throughput.parse_value("[1, 2]") == [1, 2]
    assert throughput.parse_value("adamw") == "adamw"
    with pytest.raises(SystemExit):
        throughput.main(["--cpu", "--which", "modpo,nope"])
    with pytest.raises(SystemExit):
        throughput.main(["--cpu", "--modpo-set", "no_equals_sign"])
    with pytest.raises(SystemExit):
        throughput.main(["--cpu", "--modpo-variant", "no_colon=true"])


def test_prefix_sharing_counts_sequence_tokens_but_runs_each_prompt_once(tmp_path):
    throughput = load("throughput")
    bench_common = load("bench_common")
    out = tmp_path / "shared.json"
    throughput.main(["--cpu", "--steps", "2", "--warmup", "1", "--which", "modpo,trl",
                     "--modpo-variant", "shared:prefix_sharing=true", "--out", str(out)])
    written = json.loads(out.read_text())
    assert list(written["results"]) == ["modpo", "modpo[shared]", "trl"]
    assert written["results"]["modpo"]["settings"].get("prefix_sharing") is None  # the variant's setting stays its own
    ratios = written["variant_ratios"]["modpo[shared]"]
    variant, trl = written["results"]["modpo[shared]"], written["results"]["trl"]
    assert ratios["tokens_per_s"] == pytest.approx(variant["tokens_per_s"] / trl["tokens_per_s"])
    cfg, result = written["config"], variant
    assert result["settings"]["prefix_sharing"] is True
    pairs = cfg["pairs_per_step"]
    rows = bench_common.synthetic_pairs(cfg["steps"] * pairs, cfg["prompt_len"], cfg["response_len"],
                                        cfg["vocab_size"], seed=cfg["seed"])
    steps = [rows[i : i + pairs] for i in range(0, len(rows), pairs)]
    assert result["tokens_per_step"] == [recount(step) for step in steps]  # tokens/s means the same as for TRL
    prompts = [sum(len(r["prompt"].split()) for r in step) for step in steps]
    assert result["tokens_computed_per_step"] == [recount(step) - p for step, p in zip(steps, prompts)]


def test_precompute_benchmark_times_both_layouts(tmp_path):
    precompute = load("precompute")
    out = tmp_path / "pre.json"
    precompute.main(["--cpu", "--pairs", "6", "--repeats", "1", "--batch-size", "4", "--out", str(out)])
    written = json.loads(out.read_text())
    assert set(written["results"]) == {"fp32", "fp32+prefix_sharing"}
    cfg = written["config"]
    for result in written["results"].values():
        assert result["median_pass_s"] == pytest.approx(statistics.median(result["pass_times_s"]))
        assert result["tokens_per_s"] == pytest.approx(cfg["tokens"] / result["median_pass_s"])
        assert result["forward_mfu"] == pytest.approx(result["tokens_per_s"] * 2 * cfg["n_flops_params"] / 1e12)


def test_real_data_layout_benchmark_bookkeeping(tmp_path):
    """benchmarks/layouts_real_data.py on a tiny saved model and a JSONL file: every layout counts the same
    sequence tokens, and prefix sharing runs exactly one prompt fewer per pair."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tiny

    layouts = load("layouts_real_data")
    tok = tiny.tokenizer()
    model_dir = tiny.save(tiny.model(len(tok), seed=0, layers=2), tok, tmp_path / "model")
    rows = tiny.rows(6, seed=2, max_words=6)
    data = tiny.write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "layouts.json"
    layouts.main(["--model", model_dir, "--data", f"jsonl:{data}", "--pairs-per-step", "2", "--steps", "3",
                  "--warmup", "1", "--lora", "0", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["padded", "padding_free", "prefix_sharing"]
    tokens = {name: r["tokens_per_step"] for name, r in results.items()}
    assert len(set(tokens.values())) == 1
    timed = rows[2:]  # steps 2 and 3 (2 pairs each) are timed
    prompt_tokens = sum(len(tok(r["prompt"])["input_ids"]) for r in timed) / 2  # per step
    assert results["padding_free"]["tokens_computed_per_step"] == tokens["padded"]
    assert results["prefix_sharing"]["tokens_computed_per_step"] == pytest.approx(tokens["padded"] - prompt_tokens)
    for r in results.values():
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["median_step_s"])
