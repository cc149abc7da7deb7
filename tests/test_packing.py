"""Batch layouts: padded, padding-free and prefix sharing score every response identically.

Each layout is checked against per-sequence forward passes (no padding, no packing), in value and in gradient,
for a Llama and a Qwen2 (grouped-query attention, biased projections), and through MODPOTrainer end to end.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

from modpo import MODPOConfig, MODPOTrainer
from modpo.batch import concatenated_inputs
from modpo.logps import sequence_logps
from modpo.packing import pack_shared_prompt, use_padding_free

import tiny

PROMPTS = [[1, 4, 5], [1, 6], [1, 7, 4, 5, 6], [1, 5]]
CHOSEN = [[8, 9, 10, 2], [11, 2], [12, 13, 2], [14, 15, 8, 9, 10, 11, 2]]
REJECTED = [[9, 2], [12, 13, 14, 15, 2], [8, 2], [10, 2]]
LAYOUTS = {
    "padded": {},
    "padding_free": {"padding_free": True},
    "padding_free_bucketed": {"padding_free": True, "pad_to_multiple_of": 16},
    "prefix_sharing": {"prefix_sharing": True},
    "prefix_sharing_bucketed": {"prefix_sharing": True, "pad_to_multiple_of": 16},
}
ROW_WEIGHTS = torch.tensor([1.0, -0.5, 2.0, 0.25, 0.5, -1.0, 1.5, -0.25])  # distinct weight per sequence


def qwen2(vocab_size: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).float()


MODELS = {"llama": lambda vocab: tiny.model(vocab, seed=1, layers=2), "qwen2": qwen2}


def per_sequence(model) -> torch.Tensor:
    """log pi(response | prompt) from one unpadded forward pass per sequence, fp64 log-softmax."""
    out = []
    for p, r in zip(PROMPTS * 2, CHOSEN + REJECTED):
        ids = torch.tensor([p + r])
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        out.append(sum(log_probs[len(p) - 1 + j, token] for j, token in enumerate(r)))
    return torch.stack(out).float()


def scored(model, layout: dict, chunked: bool):
    """Values and parameter gradients of the weighted sum of sequence log-probs under one batch layout."""
    model = copy.deepcopy(model)
    if layout.get("padding_free") or layout.get("prefix_sharing"):
        use_padding_free(model, prefix_sharing=layout.get("prefix_sharing", False))
    batch = concatenated_inputs(PROMPTS, CHOSEN, REJECTED, pad_token_id=0, **layout)
    values = sequence_logps(model, chunked=chunked, num_sequences=8, **batch)
    (values * ROW_WEIGHTS).sum().backward()
    return values.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param](32)


def test_every_layout_matches_per_sequence_forward_passes(model):
    expected = per_sequence(model)
    (expected * ROW_WEIGHTS).sum().backward()
    expected = expected.detach()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for name, layout in LAYOUTS.items():
        for chunked in (True, False):
            values, grads = scored(model, layout, chunked)
            assert torch.allclose(values, expected, atol=1e-5), (name, chunked, values, expected)
            assert grads.keys() == expected_grads.keys()
            for param, grad in grads.items():
                assert torch.allclose(grad, expected_grads[param], atol=1e-5, rtol=1e-4), (name, chunked, param)


def test_prefix_sharing_runs_each_prompt_once():
    batch = concatenated_inputs(PROMPTS, CHOSEN, REJECTED, pad_token_id=0, prefix_sharing=True)
    padded = concatenated_inputs(PROMPTS, CHOSEN, REJECTED, pad_token_id=0, padding_free=True)
    prompt_tokens = sum(len(p) for p in PROMPTS)
    assert batch["input_ids"].shape[1] == padded["input_ids"].shape[1] - prompt_tokens
    assert batch["sequence_index"].shape == batch["input_ids"].shape


def test_shared_prompt_layout_by_hand():
    batch = pack_shared_prompt([[5, 6]], [[7, 8]], [[9, 10, 11]], pad_token_id=0, pad_to_multiple_of=8)
    # [p p c c filler | r r r]; the filler rounds 7 tokens up to 8
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0, 9, 10, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 2, 3, 4]]
    assert batch["sequence_index"].tolist() == [[0, 0, 0, 0, 2, 1, 1, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 5] and batch["rejected_offset"] == 5
    assert batch["rejected_key_index"].tolist() == [0, 1, 5, 6, 7]  # its prompt, then itself
    assert batch["rejected_cu_seq_lens_q"].tolist() == [0, 3] and batch["rejected_cu_seq_lens_k"].tolist() == [0, 5]
    # chosen 7 is predicted at position 1 (last prompt token), 8 at 2; rejected 9 at 1, 10 at 5, 11 at 6
    assert batch["score_positions"].tolist() == [1, 2, 1, 5, 6]
    assert batch["score_targets"].tolist() == [7, 8, 9, 10, 11]
    assert batch["score_sequences"].tolist() == [0, 0, 1, 1, 1]


def preference_rows():
    return Dataset.from_list(tiny.rows(12, seed=4, num_margins=1, max_words=5))


TRAINER_LAYOUTS = {"padding_free": {"padding_free": True}, "prefix_sharing": {"prefix_sharing": True},
                   "prefix_sharing_checkpointed": {"prefix_sharing": True, "gradient_checkpointing": True},
                   "prefix_sharing_lora": {"prefix_sharing": True}}


@pytest.mark.parametrize("layout", sorted(TRAINER_LAYOUTS))
def test_trainer_loss_curve_matches_padded_batches(tmp_path, layout):
    tok = tiny.tokenizer()
    base = tiny.model(len(tok), seed=2, layers=2)

    lora = None
    if layout.endswith("lora"):  # the reference is the base with the adapter disabled, also in the precompute
        from peft import LoraConfig

        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")

    def losses(**settings):
        # a cache of its own per run: each run computes its reference log-probs in its own layout
        config = MODPOConfig(output_dir=str(tmp_path / layout), weights=[0.7, 0.3], per_device_train_batch_size=4,
                             max_steps=3, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, cache_dir=str(tmp_path / f"cache{len(settings)}"), **settings)
        trainer = MODPOTrainer(copy.deepcopy(base), args=config, train_dataset=preference_rows(), processing_class=tok,
                               eval_dataset=Dataset.from_list(tiny.rows(6, seed=9, num_margins=1)), peft_config=lora)
        trainer.train()
        history = [h for h in trainer.state.log_history if "loss" in h]
        tokens = trainer.token_counts["forward"]
        return [h["loss"] for h in history] + [trainer.evaluate()["eval_loss"]], tokens

    padded, padded_tokens = losses()
    packed, packed_tokens = losses(**TRAINER_LAYOUTS[layout])
    assert len(packed) == 4  # three training steps, then evaluation
    assert packed == pytest.approx(padded, abs=1e-5)
    if layout.startswith("prefix_sharing"):  # the prompt ran once per pair instead of twice
        data = preference_rows()
        prompt_tokens = sum(len(tok(row["prompt"])["input_ids"]) for row in data)
        assert packed_tokens == padded_tokens - prompt_tokens
    else:
        assert packed_tokens == padded_tokens


def test_pair_precompute_with_prefix_sharing_matches_per_side_precompute(model):
    from modpo.logps import batched_pair_logps, batched_sequence_logps

    attention_before = model.config._attn_implementation
    for batch_size in (2, 3, 16):  # 1 pair, 1 pair (odd size), all pairs per forward
        chosen, rejected = batched_pair_logps(model, PROMPTS, CHOSEN, REJECTED, pad_token_id=0, batch_size=batch_size)
        assert torch.allclose(chosen, batched_sequence_logps(model, PROMPTS, CHOSEN, 0, batch_size), atol=1e-5)
        assert torch.allclose(rejected, batched_sequence_logps(model, PROMPTS, REJECTED, 0, batch_size), atol=1e-5)
    assert model.config._attn_implementation == attention_before  # switched for the precompute only


def test_trainer_refuses_packing_for_a_model_that_ignores_it(tmp_path, monkeypatch):
    """A model whose attention does not read the packed-sequence boundaries would attend across sequences and
    score them wrongly without an error; the trainer compares packed and padded log-probs first and refuses."""
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    import modpo.packing
    from modpo.errors import ConfigError

    def whole_row_causal(module, query, key, value, attention_mask=None, scaling=None, **kwargs):
        """Stands in for attention code that knows nothing of packing: one causal mask over the whole row."""
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2), None

    AttentionInterface.register("whole_row_causal", whole_row_causal)
    AttentionMaskInterface.register("whole_row_causal", lambda *args, **kwargs: None)
    monkeypatch.setattr(modpo.packing, "use_padding_free",
                        lambda model, prefix_sharing=False: model.set_attn_implementation("whole_row_causal"))
    tok = tiny.tokenizer()
    for layout in ("padding_free", "prefix_sharing"):
        config = MODPOConfig(output_dir=str(tmp_path / layout), weights=[0.7, 0.3], max_steps=1, report_to=[],
                             use_cpu=True, cache_dir=str(tmp_path / "cache"), **{layout: True})
        with pytest.raises(ConfigError, match=f"{layout}: .* does not keep packed sequences apart"):
            MODPOTrainer(tiny.model(len(tok), seed=2, layers=2), args=config, train_dataset=preference_rows(),
                         processing_class=tok)


def gemma2_soft_capped(vocab_size: int):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(5)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                          attn_logit_softcapping=50.0, final_logit_softcapping=None,
                                          sliding_window=4096, max_position_embeddings=64))


def qwen2_sliding(vocab_size: int, window: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(6)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        use_sliding_window=True, sliding_window=window, max_window_layers=0))


@pytest.mark.parametrize("case", ["soft_capped", "window_shorter_than_sequences", "window_longer_than_sequences"])
def test_packing_refuses_attention_it_does_not_compute(tmp_path, case):
    """Soft-capped attention (Gemma 2) and sliding windows shorter than a sequence are refused in one line;
    a window longer than every sequence changes nothing, so packing goes ahead."""
    from modpo.errors import ConfigError

    tok = tiny.tokenizer()
    model = {"soft_capped": lambda: gemma2_soft_capped(len(tok)),
             "window_shorter_than_sequences": lambda: qwen2_sliding(len(tok), window=3),
             "window_longer_than_sequences": lambda: qwen2_sliding(len(tok), window=60)}[case]()
    config = MODPOConfig(output_dir=str(tmp_path / "out"), weights=[0.7, 0.3], max_steps=1, report_to=[],
                         use_cpu=True, cache_dir=str(tmp_path / "cache"), prefix_sharing=True)
    if case == "window_longer_than_sequences":
        trainer = MODPOTrainer(model, args=config, train_dataset=preference_rows(), processing_class=tok)
        assert trainer.args.prefix_sharing
        return
    words = "soft-caps" if case == "soft_capped" else r"sliding-window attention \(3 tokens\)"
    with pytest.raises(ConfigError, match=words):
        MODPOTrainer(model, args=config, train_dataset=preference_rows(), processing_class=tok)


def fake_flash(bottom_right: bool):
    """Stands in for PyTorch's variable-length flash kernel (same call), in fp32 on CPU, with either causal
    alignment for segments with fewer queries than keys."""
    import torch.nn.functional as F

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                    enable_gqa=False):
        assert window_size == (-1, 0) and max_q >= 1 and max_k >= max_q
        pieces = []
        for q0, q1, k0, k1 in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), cu_seq_k[:-1].tolist(),
                                  cu_seq_k[1:].tolist()):
            n_q, n_k = q1 - q0, k1 - k0
            assert n_q <= max_q and n_k <= max_k
            mask = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q if bottom_right else 0)
            q, k, v = (t[a:b].transpose(0, 1)[None] for t, a, b in ((query, q0, q1), (key, k0, k1), (value, k0, k1)))
            pieces.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                         enable_gqa=enable_gqa)[0].transpose(0, 1))
        return torch.cat(pieces)

    return varlen_attn


@pytest.mark.parametrize("bottom_right", [True, False])
def test_flash_path_plumbing_and_its_alignment_check(monkeypatch, caplog, bottom_right):
    """The CUDA branch (arguments, grouped-query heads, the rejected responses' queries against prompt + own keys)
    runs here through a stand-in kernel. A kernel that aligned causal masks top-left would score rejected
    responses wrongly; the one-time check catches it and falls back to SDPA, with a warning."""
    import modpo.packing as packing

    kernel = fake_flash(bottom_right)
    monkeypatch.setattr(packing, "flash_kernel", lambda q: kernel)
    monkeypatch.setattr(packing, "_BOTTOM_RIGHT", {})  # checked once per kernel, device and dtype: start afresh
    model = qwen2(32)  # 4 query heads over 2 key/value heads
    expected = per_sequence(model).detach()
    with caplog.at_level("WARNING", logger="modpo.packing"):
        values, _ = scored(model, {"prefix_sharing": True}, chunked=True)
    assert torch.allclose(values, expected, atol=1e-5)
    assert ("does not align causal masks bottom-right" in caplog.text) is (not bottom_right)
    assert list(packing._BOTTOM_RIGHT.values()) == [bottom_right]
    if not bottom_right:  # the check is what saves the result: the kernel alone gets rejected responses wrong
        monkeypatch.setattr(packing, "_BOTTOM_RIGHT", {})
        monkeypatch.setattr(packing, "_flash_aligns_bottom_right", lambda *args: True)
        wrong, _ = scored(model, {"prefix_sharing": True}, chunked=True)
        assert torch.allclose(wrong[:4], expected[:4], atol=1e-5)  # chosen: equal numbers of queries and keys
        assert not torch.allclose(wrong[4:], expected[4:], atol=1e-3)


_OPAQUE_FLASH = []


def opaque_flash():
    """fake_flash(bottom_right=True) behind a PyTorch custom op: opaque to torch.compile, as the real kernel is."""
    if not _OPAQUE_FLASH:
        eager = fake_flash(True)

        @torch.library.custom_op("modpo_tests::varlen_attn", mutates_args=())
        def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
               max_k: int, scale: float | None, enable_gqa: bool) -> torch.Tensor:
            return eager(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0), enable_gqa=enable_gqa)

        @op.register_fake
        def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, enable_gqa):
            return torch.empty_like(q)

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                        enable_gqa=False):
            assert window_size == (-1, 0)
            return op(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, enable_gqa)

        _OPAQUE_FLASH.append(varlen_attn)
    return _OPAQUE_FLASH[0]


def test_prefix_sharing_traces_as_one_graph(monkeypatch):
    """torch.compile(fullgraph=True) traces a prefix-sharing forward through the flash branch with no graph break
    (the kernel's alignment check runs before the model, in `sequence_logps`, not inside each attention layer),
    for batches of new lengths, with the eager values."""
    import random

    import modpo.packing as packing

    monkeypatch.setattr(packing, "flash_kernel", lambda q: opaque_flash())
    monkeypatch.setattr(packing, "_BOTTOM_RIGHT", {})
    torch._dynamo.reset()
    model = qwen2(40)
    use_padding_free(model, prefix_sharing=True)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    rng = random.Random(0)
    for _ in range(3):
        words = lambda low, high: [rng.randint(4, 39) for _ in range(rng.randint(low, high))]
        prompts, chosen, rejected = [[1] + words(2, 12) for _ in range(3)], [words(1, 9) + [2] for _ in range(3)], \
            [words(1, 9) + [2] for _ in range(3)]
        batch = concatenated_inputs(prompts, chosen, rejected, 0, prefix_sharing=True)
        with torch.no_grad():
            traced = sequence_logps(compiled, num_sequences=6, **batch)
            eager = sequence_logps(model, num_sequences=6, **batch)
        assert torch.allclose(traced, eager, atol=1e-5)
    assert list(packing._BOTTOM_RIGHT.values()) == [True]
    torch._dynamo.reset()
