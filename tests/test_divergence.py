"""KL(pi || pi_ref) from a point's own samples (`modpo.front.divergence`) and its place in the evaluation record."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from modpo.front.divergence import kl_summary, log_ratios, response_ids
from modpo.front.evaluators import build_evaluators
from modpo.front.generate import SamplingSettings
from modpo.front.sweep import evaluate_model


def test_a_response_ends_at_its_first_eos():
    assert response_ids([5, 6, 2, 2, 2], eos_id=2) == [5, 6, 2]
    assert response_ids([5, 6, 7], eos_id=2) == [5, 6, 7]
    assert response_ids([2, 0, 0], eos_id=2) == [2]


def by_hand(model, prompt: list[int], response: list[int]) -> float:
    """log pi(response | prompt), one sequence, one forward, no batching."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return float(logps.gather(1, torch.tensor(response)[:, None]).sum())


def test_log_ratios_equal_the_difference_of_sequence_log_probs():
    tok = tiny.tokenizer()
    reference = tiny.model(len(tok), seed=0)
    policy = tiny.perturbed(reference, seed=1, scale=0.2)
    prompts = [[1, 4, 5], [1, 6], [1, 4, 4, 7]]
    responses = [[8, 9, 2], [10, 11, 12, 13], [9]]
    ratios = log_ratios(policy, reference, prompts, responses, tok.pad_token_id)
    expected = [by_hand(policy, p, r) - by_hand(reference, p, r) for p, r in zip(prompts, responses)]
    assert ratios.tolist() == pytest.approx(expected, abs=1e-4)
    assert log_ratios(reference, reference, prompts, responses, tok.pad_token_id).abs().max().item() == 0
    prefixed = log_ratios(policy, reference, prompts, responses, tok.pad_token_id, policy_prefix=[5, 5])
    assert prefixed[0].item() == pytest.approx(by_hand(policy, [5, 5] + prompts[0], responses[0])
                                               - by_hand(reference, prompts[0], responses[0]), abs=1e-4)


def test_kl_is_unbiased_only_for_samples_of_the_policy_itself():
    assert kl_summary([1.0, 3.0], 1.0, 1.0, "ref") == {"estimate": 2.0, "stderr": 1.0, "n": 2, "reference": "ref",
                                                     "unbiased": True}
    assert not kl_summary([1.0], 0.7, 1.0, "ref")["unbiased"] and not kl_summary([1.0], 1.0, 0.9, "ref")["unbiased"]


def test_evaluation_records_every_sample_with_its_scores_and_log_ratio(tmp_path):
    tok = tiny.tokenizer()
    reference = tiny.model(len(tok), seed=0)
    base = tiny.save(reference, tok, tmp_path / "base")
    point = tiny.save(tiny.perturbed(reference, seed=2, scale=0.3), tok, tmp_path / "point")
    evaluators = build_evaluators([{"type": "length_penalty", "names": ["minus_words"]}])
    settings = SamplingSettings(samples_per_prompt=3, max_new_tokens=5, seed=0)
    prompts = ["p0 p1", "p2", "p3 p3 p1"]
    result = evaluate_model(tmp_path / "point", "point", [1.0], prompts, settings, evaluators, kl_reference=base)
    record = json.loads((tmp_path / "point" / "evaluation.json").read_text())
    samples = record["samples"]
    assert len(samples) == 9 and result["n"] == 9
    ratios = [s["log_ratio"] for s in samples]
    assert result["kl"]["estimate"] == pytest.approx(sum(ratios) / 9) and result["kl"]["reference"] == base
    assert result["minus_words"]["mean"] == pytest.approx(sum(-len(s["response"].split()) for s in samples) / 9)
    assert all(s["scores"]["minus_words"] == -len(s["response"].split()) for s in samples)
    own = evaluate_model(tmp_path / "base", "base", None, prompts, settings, evaluators, kl_reference=base)
    assert own["kl"]["estimate"] == 0  # the reference against itself
    assert "kl" not in [o for o in result if isinstance(result[o], dict) and "mean" in result[o]]
