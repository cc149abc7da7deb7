"""Decoding-time mixing (MOD): p_w proportional to prod_k pi_k ** w_k at every step, from per-objective models.

Checked against independent computations: the mixed distribution in probability space, the nucleus by hand,
greedy mixing of one model against transformers' own greedy generation, and the frequencies of sampled tokens
against p_w."""

from __future__ import annotations

import pytest
import torch

import tiny
from modpo.baselines.mixing import mixed_log_probs, nucleus, sample_mixed
from modpo.front.generate import SamplingSettings, sample_responses


def test_the_mixture_is_the_normalised_weighted_geometric_mean():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=generator), torch.randn(3, 7, generator=generator)
    assert torch.allclose(mixed_log_probs([a, b], [1.0, 0.0]), torch.log_softmax(a, -1), atol=1e-6)
    pa, pb = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    product = pa ** 0.3 * pb ** 0.7
    expected = product / product.sum(-1, keepdim=True)
    assert torch.allclose(mixed_log_probs([a, b], [0.3, 0.7]).exp().double(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="2 models and 3 weights"):
        mixed_log_probs([a, b], [0.2, 0.3, 0.5])


def test_nucleus_by_hand():
    log_probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = nucleus(log_probs, 0.75).exp()  # 0.5 + 0.3 reaches 0.75: the last two go
    assert torch.allclose(kept, torch.tensor([[0.5, 0.3, 0.0, 0.0]]))
    assert torch.equal(nucleus(log_probs, 1.0), log_probs)


def test_greedy_mixing_of_one_model_is_greedy_generation():
    tok = tiny.tokenizer()
    model = tiny.model(len(tok), seed=3)
    prompts = ["p0 a", "p1", "p2 b c", "p3"]
    settings = SamplingSettings(max_new_tokens=5, temperature=0.0, batch_size=4)
    mixed, tokens = sample_mixed([model], [1.0], tok, prompts, settings)
    assert [s["response"] for s in mixed] == [s["response"] for s in sample_responses(model, tok, prompts, settings)]
    assert tokens > 0


def test_sampled_tokens_follow_the_mixture():
    tok = tiny.tokenizer()
    models = [tiny.model(len(tok), seed=1), tiny.model(len(tok), seed=2)]
    weights = [0.4, 0.6]
    settings = SamplingSettings(samples_per_prompt=3000, max_new_tokens=1, temperature=1.0, batch_size=3000)
    samples, _ = sample_mixed(models, weights, tok, ["p0"], settings)
    ids = torch.tensor([tok("p0")["input_ids"]])
    probs = mixed_log_probs([m(input_ids=ids).logits[0, -1] for m in models], weights).exp()
    expected: dict[str, float] = {}  # by the text a token decodes to (special tokens all decode to "")
    for token, p in enumerate(probs.tolist()):
        text = tok.decode([token], skip_special_tokens=True)
        expected[text] = expected.get(text, 0.0) + p
    seen = {text: sum(s["response"] == text for s in samples) / len(samples) for text in expected}
    total_variation = 0.5 * sum(abs(seen[t] - expected[t]) for t in expected)
    assert total_variation < 0.05, total_variation  # sampling noise at 3000 draws is about 0.02 here
