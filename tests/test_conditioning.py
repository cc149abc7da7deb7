"""Weight-conditioned MODPO: the rendering of w, per-row weights in the loss, the seeded sampler, refusals, and one
conditioned model trained once reaching the closed-form optimum at several weight vectors."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from datasets import Dataset

import tiny
from modpo import MODPOConfig, MODPOTrainer
from modpo.batch import PreferenceCollator
from modpo.conditioning import FORMATS, Conditioner, WeightSampler, check_request, condition_ids, on_grid, render, vocabulary
from modpo.data.encode import encode
from modpo.logps import batched_sequence_logps
from modpo.loss import modpo_loss
from modpo.models import tiny_causal_lm, word_tokenizer
from modpo.weight_embedding import applied
from test_optimum import K0, PROMPTS, R1, R2, RESPONSES, bradley_terry_rows


def test_rendering_is_one_fixed_format_for_text_and_chat():
    assert render([0.3, 0.7]) == "weights: 0.30 0.70\n"
    assert on_grid([1 / 3, 1 / 3, 1 / 3]) == [0.34, 0.33, 0.33] and sum(on_grid([0.123, 0.456, 0.421])) == 1.0
    words = tiny.tokenizer(words=tiny.WORDS + vocabulary())
    ids = condition_ids([0.3, 0.7], words)
    assert words.convert_ids_to_tokens(ids) == ["weights:", "0.30", "0.70"]  # every word of it is known
    chat = tiny.bpe_tokenizer("chatml")  # a chat row: the condition comes before the rendered conversation
    prompt = [{"role": "user", "content": "Tell me a story."}]
    prompt_ids, _ = encode(prompt, [[{"role": "assistant", "content": "No."}]], chat)
    conditioned = condition_ids([0.3, 0.7], chat) + prompt_ids
    assert chat.decode(conditioned).startswith("weights: 0.30 0.70\n<|im_start|>system")


def test_per_row_weights_equal_a_loop_of_the_scalar_loss():
    generator = torch.Generator().manual_seed(0)
    b, k = 5, 3
    logps = [torch.randn(b, generator=generator) for _ in range(4)]
    margins = [torch.randn(b, k - 1, generator=generator) for _ in range(2)]
    rows = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [1.0, 0.0, 0.0], [0.34, 0.33, 0.33], [0.9, 0.05, 0.05]])
    for loss_type, eps in (("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0)):
        batched, chosen, rejected = modpo_loss(*logps, *margins, rows, beta=0.3, label_smoothing=eps,
                                               loss_type=loss_type)
        for i in range(b):
            single, _, _ = modpo_loss(*(t[i : i + 1] for t in logps), *(m[i : i + 1] for m in margins),
                                      rows[i].tolist(), beta=0.3, label_smoothing=eps, loss_type=loss_type)
            assert torch.allclose(batched[i], single[0], atol=1e-6)
    with pytest.raises(ValueError, match="pair 1: weights\\[0\\]"):
        modpo_loss(*logps, *margins, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]] + [[1.0, 0, 0]] * 3))
    with pytest.raises(ValueError, match="shape"):
        modpo_loss(*logps, *margins, torch.ones(b, 2) / 2)


def test_the_sampler_is_seeded_per_row_and_epoch():
    sampler = WeightSampler(3, "dirichlet", concentration=1.0, seed=7)
    first = sampler.weights_for(range(6), epoch=0)
    assert first == WeightSampler(3, "dirichlet", concentration=1.0, seed=7).weights_for(range(6), epoch=0)
    assert first[2:4] == sampler.weights_for([2, 3], epoch=0)  # a row's weights do not depend on its batch
    assert first != sampler.weights_for(range(6), epoch=1)    # drawn anew every epoch
    assert first != WeightSampler(3, "dirichlet", seed=8).weights_for(range(6), epoch=0)
    for w in first + sampler.weights_for(range(200), epoch=3):
        assert abs(sum(w) - 1) < 1e-9 and w[0] >= 0.05 and min(w) >= 0 and w == on_grid(w)
    cycle = WeightSampler(2, "cycle", weight_list=[[0.2, 0.8], [0.7, 0.3]])
    assert cycle.weights_for([0, 1, 2], epoch=1) == [[0.7, 0.3], [0.2, 0.8], [0.7, 0.3]]


@pytest.mark.parametrize("weights, words", [([0.3, 0.3, 0.4], "3 entries"), ([0.3, 0.6], "sum to 0.9"),
                                            ([0.0, 1.0], "weights[0]"), ([0.004, 0.996], "below 0.01")])
def test_a_conditioned_model_refuses_weights_it_cannot_mean(weights, words):
    with pytest.raises(ValueError, match=words.replace("[", "\\[").replace("]", "\\]")):
        check_request(weights, 2)


def test_the_collator_shows_each_row_its_weights(tmp_path):
    tok = tiny.tokenizer(words=tiny.WORDS + vocabulary())
    conditioner = Conditioner(WeightSampler(2, "cycle", weight_list=[[0.2, 0.8], [0.6, 0.4]]), tok)
    features = [{"prompt_ids": [4], "chosen_ids": [5, 2], "rejected_ids": [6, 2], "row_index": i} for i in range(2)]
    batch = PreferenceCollator(pad_token_id=0, conditioner=conditioner)(features)
    assert torch.allclose(batch["weights"], torch.tensor([[0.2, 0.8], [0.6, 0.4]]))
    first_row = batch["layout"]["input_ids"][0].tolist()
    assert first_row[:4] == condition_ids([0.2, 0.8], tok) + [4]


@pytest.mark.parametrize("sampling", [{"weight_sampling": "dirichlet"},
                                      {"weight_sampling": "cycle", "weight_list": [[0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]}])
def test_a_conditioned_row_with_its_prefix_fits_max_length(tmp_path, sampling):
    """The prefix is part of the row: rows are fitted to max_length less the longest prefix the sampler can draw,
    so no sequence the policy sees is longer than max_length (here every response is longer than the room)."""
    tok = tiny.tokenizer(words=tiny.WORDS + vocabulary())
    rows = tiny.rows(6, seed=3, num_margins=2, max_words=12)
    max_length = 9
    args = MODPOConfig(output_dir=str(tmp_path), weights=[0.4, 0.3, 0.3], **sampling, max_length=max_length,
                       report_to=[], save_strategy="no", use_cpu=True, cache_dir=str(tmp_path / "cache"))
    trainer = MODPOTrainer(tiny.model(len(tok)), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    room = len(condition_ids([0.4, 0.3, 0.3], tok))  # "weights:" and three numbers, one word each
    features = [trainer.train_dataset[i] for i in range(len(rows))]
    for epoch in range(3):
        trainer.conditioner.epoch = epoch
        batch = trainer.data_collator(features)
        lengths = batch["layout"]["attention_mask"].sum(dim=1)
        assert lengths.max().item() == max_length, lengths  # responses are cut to fill the row exactly
    for f in features:
        assert len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"])) <= max_length - room
    assert trainer.conditioner.room == room


@pytest.mark.parametrize("format", FORMATS)
def test_one_conditioned_model_reaches_the_optimum_at_every_weight_it_is_asked_for(tmp_path, format):
    """The closed-form bandit of test_optimum (K = 3, Bradley-Terry pairs, two margin columns), trained once with
    the weight vectors cycled over rows and epochs: at each w, beta log pi(y|x, w) / pi_ref(y|x) = w . r(x, y) up to
    a per-prompt constant. pi_ref is the unconditioned initial model; w is shown either way (`FORMATS`)."""
    asked = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.4, 0.1, 0.5]]
    tokenizer = word_tokenizer(PROMPTS + RESPONSES + vocabulary())
    model = tiny_causal_lm(len(tokenizer), hidden_size=32, layers=1, heads=2, seed=0)
    rows = bradley_terry_rows()
    beta = 0.5
    args = MODPOConfig(output_dir=str(tmp_path), weights=[1 / 3] * 3, weight_sampling="cycle", weight_list=asked,
                       conditioning=format,
                       beta=beta, per_device_train_batch_size=len(rows), max_steps=600, learning_rate=2e-2,
                       lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, seed=0,
                       max_length=16, append_eos=False, cache_dir=str(tmp_path / "cache"))
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS for _ in RESPONSES]
    response_ids = [tokenizer(r)["input_ids"] for _ in PROMPTS for r in RESPONSES]
    reference = batched_sequence_logps(model, prompt_ids, response_ids, tokenizer.pad_token_id)
    trainer = MODPOTrainer(model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    centred = lambda t: t - t.mean(dim=1, keepdim=True)
    for w in asked:
        if format == "prefix":
            shown, conditioned = contextlib.nullcontext(), [condition_ids(w, tokenizer) + ids for ids in prompt_ids]
        else:
            shown = applied(trainer.model.get_input_embeddings(), trainer.weight_embedding, torch.tensor([[w]]))
            conditioned = prompt_ids
        with shown:
            logps = batched_sequence_logps(trainer.model, conditioned, response_ids, tokenizer.pad_token_id)
        learned = beta * (logps - reference)
        target = torch.tensor([[w[0] * math.log(K0[p][y]) + w[1] * R1[p][y] + w[2] * R2[p][y]
                                for y in range(len(RESPONSES))] for p in PROMPTS], dtype=torch.float64)
        error = (centred(learned.reshape(len(PROMPTS), -1).double()) - centred(target)).abs().max().item()
        assert error < 0.1, (w, error)
