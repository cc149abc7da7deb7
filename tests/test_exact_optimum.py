"""The demo's exact optimum (modpo.demo.optimum) against a brute-force computation, and the report's optimum section.

The brute force scores every response of every topic with its own forward passes (one per 3-word prefix, an
explicit softmax over the vocabulary less eos at each position, as sampling with min_new_tokens draws), weighs each response by a loop in plain floats with
exp(w . r / (beta T)) using the task's own `rewards`, and adds the malformed mass with reward 0.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from modpo.demo import task
from modpo.demo.optimum import ExactOptimum, exact_optimum, reference_logps, reward_table, topic_weights
from modpo.front.report import hypervolume, optimum_section
from modpo.models import tiny_causal_lm

PROMPTS = ["topic0", "topic0", "topic0", "topic2", "topic3"]  # uneven topic proportions; topic1 absent


@pytest.fixture(scope="module")
def reference():
    tokenizer = task.tokenizer()
    return tiny_causal_lm(len(tokenizer), hidden_size=32, layers=1, heads=2, seed=3, max_positions=16), tokenizer


@torch.no_grad()
def brute_force_logps(model, tokenizer) -> dict[tuple[str, tuple[str, ...]], float]:
    word_ids = [tokenizer.convert_tokens_to_ids(w) for w in task.WORDS]
    out = {}
    for topic in task.TOPICS:
        (topic_id,) = tokenizer(topic)["input_ids"]
        prefixes = list(itertools.product(range(task.NUM_WORDS), repeat=task.RESPONSE_LENGTH - 1))
        ids = torch.tensor([[topic_id] + [word_ids[i] for i in prefix] for prefix in prefixes])
        logits = model(input_ids=ids).logits.double()
        logits[..., tokenizer.eos_token_id] = -math.inf  # barred, as sampling bars it for the response's length
        probs = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)  # explicit softmax per position
        for row, prefix in enumerate(prefixes):
            head = sum(math.log(probs[row, j, word_ids[i]].item()) for j, i in enumerate(prefix))
            for last in range(task.NUM_WORDS):
                words = tuple(task.WORDS[i] for i in prefix + (last,))
                out[topic, words] = head + math.log(probs[row, len(prefix), word_ids[last]].item())
    return out


def brute_force_point(logps, prompts, weights, beta, temperature) -> list[float]:
    totals = [0.0] * len(task.OBJECTIVES)
    for prompt in prompts:
        z, sums, valid = 0.0, [0.0] * len(task.OBJECTIVES), 0.0
        for (topic, words), logp in logps.items():
            if topic != prompt:
                continue
            r = task.rewards(topic, " ".join(words))
            weight = math.exp(logp + sum(w * x for w, x in zip(weights, r)) / (beta * temperature))
            valid += math.exp(logp)
            z += weight
            sums = [s + weight * x for s, x in zip(sums, r)]
        z += 1.0 - valid  # malformed responses: reward 0, so weight exp(0) times their mass
        totals = [t + s / z / len(prompts) for t, s in zip(totals, sums)]
    return totals


def test_the_optimum_matches_brute_force(reference):
    model, tokenizer = reference
    logps = brute_force_logps(model, tokenizer)
    assert 0.05 < sum(math.exp(v) for v in logps.values()) / task.NUM_TOPICS < 0.95  # a real malformed lump
    optimum = ExactOptimum(reference_logps(model, tokenizer), reward_table(), topic_weights(PROMPTS), 0.0, 0.0)
    for beta, temperature in ((0.1, 0.1), (1.0, 0.5)):
        optimum.beta, optimum.temperature = beta, temperature
        for weights in ([0.1, 0.9], [0.5, 0.5], [0.9, 0.1], [1.0, 0.0]):
            expected = brute_force_point(logps, PROMPTS, weights, beta, temperature)
            assert optimum(weights) == pytest.approx(expected, abs=1e-5), (beta, temperature, weights)
    # no tilt: the reference's own expected rewards, malformed scoring 0
    assert optimum.reference_point() == pytest.approx(brute_force_point(logps, PROMPTS, [0, 0], 1, 1), abs=1e-6)


def test_the_optimum_moves_along_the_trade_off(reference):
    """More helpfulness weight: more helpful and less harmless; a sharp tilt reaches the task's best response."""
    model, tokenizer = reference
    optimum = ExactOptimum(reference_logps(model, tokenizer), reward_table(), topic_weights(PROMPTS), 0.01, 0.1)
    points = [optimum([w, 1 - w]) for w in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert all(a[0] < b[0] and a[1] > b[1] for a, b in zip(points, points[1:]))
    for w in ([0.9, 0.1], [0.2, 0.8]):
        best = task.rewards("topic0", task.best_response("topic0", tuple(w)))
        sharp = ExactOptimum(optimum.logps, optimum.rewards, topic_weights(["topic0"]), 1e-4, 0.1)(w)
        assert sharp == pytest.approx(list(best), abs=1e-3)


def test_exact_optimum_loads_a_model_folder(reference, tmp_path):
    model, tokenizer = reference
    model.save_pretrained(tmp_path / "ref")
    tokenizer.save_pretrained(tmp_path / "ref")
    loaded = exact_optimum(str(tmp_path / "ref"), PROMPTS, beta=0.1)
    assert loaded.temperature == task.PREFERENCE_TEMPERATURE
    assert torch.allclose(loaded.logps, reference_logps(model, tokenizer), atol=1e-6)


def test_the_report_section_against_a_given_optimum():
    """Gaps, distances, hypervolumes and the fraction, from the points and a plain optimum function."""
    objectives = ("a", "b")
    optimum = lambda w: [math.sqrt(w[0]), math.sqrt(1 - w[0])]  # the quarter circle
    points = [{"name": "sft", "weights": None, "a": {"mean": 0.9}, "b": {"mean": 0.9}}]  # not a weighted point
    points += [{"name": f"w{w}", "weights": [w, 1 - w], "a": {"mean": math.sqrt(w) - 0.1},
                "b": {"mean": math.sqrt(1 - w) - 0.2}} for w in (0.2, 0.5, 0.8)]
    section = optimum_section(points, objectives, [0.0, 0.0], optimum, curve_size=5)
    assert [r["name"] for r in section["points"]] == ["w0.2", "w0.5", "w0.8"]
    for r in section["points"]:
        assert r["gap"]["a"] == pytest.approx(0.1) and r["gap"]["b"] == pytest.approx(0.2)
        assert r["distance"] == pytest.approx(math.sqrt(0.05))
    best = hypervolume([optimum([w, 1 - w]) for w in (0.2, 0.5, 0.8)], [0.0, 0.0])
    got = hypervolume([[p["a"]["mean"], p["b"]["mean"]] for p in points[1:]], [0.0, 0.0])
    assert section["hypervolume"] == pytest.approx(best)
    assert section["fronts"]["MODPO"]["fraction"] == pytest.approx(got / best) and got < best
    assert [c["weights"][0] for c in section["curve"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert section["curve"][2]["a"] == pytest.approx(math.sqrt(0.5))
