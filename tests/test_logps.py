"""sequence_logps: the chunked and the full path agree with each other and with a hand computation."""

from __future__ import annotations

import pytest
import torch

from modpo import logps as logps_module
from modpo.batch import pad
from modpo.logps import batched_pair_logps, batched_sequence_logps, chunked_head_agrees, output_head, sequence_logps

import tiny

PROMPTS = [[1, 4, 5], [1, 6], [1, 7, 4, 5, 6], [1, 5]]
RESPONSES = [[8, 9, 10, 2], [11, 2], [12, 13, 2], [14, 15, 8, 9, 10, 11, 2]]


def padded_batch(prompts=PROMPTS, responses=RESPONSES, pad_id=0):
    sequences = [p + r for p, r in zip(prompts, responses)]
    return (pad(sequences, pad_id), pad([[1] * len(s) for s in sequences], 0),
            pad([[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)], 0))


@pytest.fixture(scope="module")
def lm():
    tok = tiny.tokenizer()
    model = tiny.model(len(tok), seed=1, layers=2)
    model.eval()
    return model


def by_hand(model, prompts=PROMPTS, responses=RESPONSES) -> torch.Tensor:
    """log_softmax of the logits of each unpadded sequence, summed over the response tokens."""
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([p + r])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            out.append(sum(log_probs[t - 1, ids[0, t]].item() for t in range(len(p), len(p) + len(r))))
    return torch.tensor(out, dtype=torch.float64)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def values_and_gradients(model, chunked, batch):
    model.zero_grad(set_to_none=True)
    values = sequence_logps(model, *batch, chunked=chunked)
    (values * torch.tensor([1.0, -0.5, 2.0, 0.25])).sum().backward()  # distinct row weights
    return values.detach(), gradients(model)


def test_chunked_and_full_agree_in_value_and_gradient(lm):
    batch = padded_batch()
    assert batch[0].shape[1] > min(len(p) + len(r) for p, r in zip(PROMPTS, RESPONSES))  # some rows are padded
    assert output_head(lm) is lm.lm_head  # the chunked path really is taken
    full_values, full_grads = values_and_gradients(lm, False, batch)
    chunked_values, chunked_grads = values_and_gradients(lm, True, batch)
    assert full_values.dtype == torch.float32 and full_values.shape == (4,)
    assert torch.allclose(full_values, chunked_values, atol=1e-5)
    assert full_grads.keys() == chunked_grads.keys() and len(full_grads) == len(list(lm.parameters()))
    for name in full_grads:
        assert torch.allclose(full_grads[name], chunked_grads[name], atol=1e-5, rtol=1e-4), name
    assert any(g.abs().sum() > 0 for g in full_grads.values())
    lm.zero_grad(set_to_none=True)


@pytest.mark.parametrize("chunked", [False, True])
def test_equals_hand_computation(lm, chunked):
    with torch.no_grad():
        values = sequence_logps(lm, *padded_batch(), chunked=chunked)
    assert torch.allclose(values.double(), by_hand(lm), atol=1e-4)
    assert (values < 0).all()


def test_chunk_smaller_than_the_token_count_still_agrees(lm, monkeypatch):
    batch = padded_batch()
    tokens = int(batch[2][:, 1:].sum())
    chunk_sizes = []
    original = logps_module.chunked_token_logps

    def spy(hidden, weight, bias, targets, chunk_size):
        chunk_sizes.append((hidden.shape[0], chunk_size))
        return original(hidden, weight, bias, targets, chunk_size)

    monkeypatch.setattr(logps_module, "chunked_token_logps", spy)
    monkeypatch.setattr(logps_module, "LOGITS_ELEMENTS_PER_CHUNK", 3 * lm.config.vocab_size)
    chunked_values, chunked_grads = values_and_gradients(lm, True, batch)
    assert chunk_sizes == [(tokens, 3)] and tokens > 3 * 3  # several chunks, the last one partial
    full_values, full_grads = values_and_gradients(lm, False, batch)
    assert torch.allclose(full_values, chunked_values, atol=1e-5)
    for name in full_grads:
        assert torch.allclose(full_grads[name], chunked_grads[name], atol=1e-5, rtol=1e-4), name
    lm.zero_grad(set_to_none=True)


def test_response_mask_of_zeros_gives_zero(lm):
    input_ids, attention_mask, response_mask = padded_batch()
    response_mask[1] = 0
    with torch.no_grad():
        values = sequence_logps(lm, input_ids, attention_mask, response_mask)
    assert values[1].item() == 0.0 and (values[[0, 2, 3]] < 0).all()


@pytest.mark.parametrize("batch_size", [1, 2, 3, 16])
def test_batched_equals_unbatched_whatever_the_order(lm, batch_size):
    order = [2, 0, 3, 1]
    prompts, responses = [PROMPTS[i] for i in order], [RESPONSES[i] for i in order]
    lm.train()
    values = batched_sequence_logps(lm, prompts, responses, pad_token_id=0, batch_size=batch_size)
    assert lm.training, "batched_sequence_logps must restore train mode"
    lm.eval()
    expected = by_hand(lm, prompts, responses)
    assert values.shape == (4,) and values.device.type == "cpu"
    assert torch.allclose(values.double(), expected, atol=1e-4)


def test_batched_pad_id_does_not_matter(lm):
    with_zero = batched_sequence_logps(lm, PROMPTS, RESPONSES, pad_token_id=0, batch_size=4)
    with_other = batched_sequence_logps(lm, PROMPTS, RESPONSES, pad_token_id=7, batch_size=4)
    assert torch.allclose(with_zero, with_other, atol=1e-5)


@pytest.mark.parametrize("attribute, value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.5)])
def test_unusual_heads_fall_back_to_the_full_path(attribute, value, monkeypatch):
    tok = tiny.tokenizer()
    model = tiny.model(len(tok), seed=2)
    model.eval()
    assert output_head(model) is not None
    setattr(model.config, attribute, value)
    assert output_head(model) is None

    def must_not_run(*args, **kwargs):
        raise AssertionError("the chunked path ran for a model whose head is not a plain Linear")

    monkeypatch.setattr(logps_module, "chunked_token_logps", must_not_run)
    with torch.no_grad():
        values = sequence_logps(model, *padded_batch(), chunked=True)
    assert torch.allclose(values.double(), by_hand(model), atol=1e-4)


def test_output_head_through_a_wrapper_and_on_a_non_linear_head():
    tok = tiny.tokenizer()
    model = tiny.model(len(tok), seed=2)

    class Wrapper(torch.nn.Module):  # DDP-style: the model is `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert output_head(Wrapper(model)) is model.lm_head
    model.set_output_embeddings(torch.nn.Sequential(model.lm_head))
    assert output_head(model) is None


def test_peft_model_chunked_equals_full():
    from peft import LoraConfig, get_peft_model

    tok = tiny.tokenizer()
    model = get_peft_model(tiny.model(len(tok), seed=3), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    assert output_head(model) is not None
    batch = padded_batch()
    with torch.no_grad():
        chunked, full = sequence_logps(model, *batch, chunked=True), sequence_logps(model, *batch, chunked=False)
    assert torch.allclose(chunked, full, atol=1e-5)
    assert torch.allclose(full.double(), by_hand(model), atol=1e-4)
    # The head is back in place after the bypass.
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)


# ------------------------------------------------------------------ the chunked head checks itself at first use

def counting_chunked(monkeypatch) -> list:
    calls = []
    original = logps_module.chunked_token_logps

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(logps_module, "chunked_token_logps", counting)
    return calls


def test_a_forward_that_changes_the_logits_turns_chunking_off(monkeypatch, caplog):
    model = tiny.with_forward(tiny.soft_capped)
    assert output_head(model) is not None  # the config list lets it through
    expected = by_hand(model)  # log-probs of the model's own (capped) logits
    with torch.no_grad():  # control: chunking really gives something else for this model
        assert not torch.allclose(sequence_logps(model, *padded_batch(), chunked=True).double(), expected, atol=1e-2)
    with caplog.at_level("WARNING", logger="modpo.logps"):
        assert chunked_head_agrees(model, PROMPTS[:2], RESPONSES[:2], 0) is False
        calls = counting_chunked(monkeypatch)
        values = batched_sequence_logps(model, PROMPTS, RESPONSES, pad_token_id=0, batch_size=2)
        chosen, rejected = batched_pair_logps(model, PROMPTS, RESPONSES, RESPONSES[::-1], pad_token_id=0)
    assert calls == []  # remembered: the full path, without checking again
    assert torch.allclose(values.double(), expected, atol=1e-4)
    assert torch.allclose(chosen, values, atol=1e-5)
    assert torch.allclose(rejected.double(), by_hand(model, PROMPTS, RESPONSES[::-1]), atol=1e-4)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "SoftCapped" in warnings[0] and "chunked LM head turned off" in warnings[0]


def test_batched_scoring_checks_before_its_first_batch(monkeypatch):
    model = tiny.with_forward(tiny.soft_capped, seed=5)
    values = batched_sequence_logps(model, PROMPTS, RESPONSES, pad_token_id=0, batch_size=4)  # no prior check
    assert torch.allclose(values.double(), by_hand(model), atol=1e-4)


@pytest.mark.parametrize("transform", [tiny.doubled, None])
def test_heads_the_check_keeps_chunked(transform, monkeypatch):
    """A plain multiplier (e.g. FalconH1's lm_head_multiplier) commutes with the head: chunking stays right."""
    model = tiny.with_forward(transform) if transform else tiny.model(len(tiny.tokenizer()), seed=6).eval()
    assert chunked_head_agrees(model, PROMPTS[:2], RESPONSES[:2], 0) is True
    calls = counting_chunked(monkeypatch)
    values = batched_sequence_logps(model, PROMPTS, RESPONSES, pad_token_id=0, batch_size=4)
    assert calls  # the chunked path ran
    assert torch.allclose(values.double(), by_hand(model), atol=1e-4)
