"""Learned weight conditioning (`conditioning: embedding`): c(w) added to every input embedding.

Checked: the policy starts as the reference for every w; every training layout gives each token its own pair's w
(against one forward pass per sequence with that sequence's w); a trained model saves c(w) beside itself (not inside
the model's weights), and generation and resuming read it back."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file

import tiny
from modpo import MODPOConfig, MODPOTrainer
from modpo.batch import concatenated_inputs
from modpo.front.steer import steering
from modpo.logps import sequence_logps
from modpo.models import load_model
from modpo.packing import use_padding_free
from modpo.weight_embedding import CONFIG_FILE, WEIGHTS_FILE, WeightEmbedding, applied, token_weights
from test_packing import CHOSEN, LAYOUTS, PROMPTS, REJECTED

PAIR_WEIGHTS = torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.8, 0.2], [0.35, 0.65]])


def moved_embedding(hidden: int) -> WeightEmbedding:
    """A weight embedding as if trained: its output layer no longer zero."""
    embedding = WeightEmbedding(2, hidden, scale=0.1, width=8, seed=1)
    with torch.no_grad():
        embedding.outer.weight.copy_(torch.randn(embedding.outer.weight.shape, generator=torch.Generator().manual_seed(2)))
    return embedding


def per_sequence(model, embedding) -> torch.Tensor:
    """log pi(response | prompt, w) from one forward pass per sequence, shown its own pair's w."""
    out = []
    for i, (p, r) in enumerate(zip(PROMPTS * 2, CHOSEN + REJECTED)):
        ids = torch.tensor([p + r])
        with applied(model.get_input_embeddings(), embedding, PAIR_WEIGHTS[i % len(PROMPTS)][None, None]):
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        out.append(sum(log_probs[len(p) - 1 + j, token] for j, token in enumerate(r)))
    return torch.stack(out).float()


def test_the_policy_starts_as_the_reference_for_every_w():
    model = tiny.model(32, seed=1, layers=2)
    embedding = WeightEmbedding.for_model(model, 2)
    batch = concatenated_inputs(PROMPTS, CHOSEN, REJECTED, pad_token_id=0)
    plain = sequence_logps(model, num_sequences=8, **batch)
    with applied(model.get_input_embeddings(), embedding, token_weights(batch, PAIR_WEIGHTS)):
        shown = sequence_logps(model, num_sequences=8, **batch)
    assert torch.equal(plain, shown)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_layout_gives_each_token_its_pairs_weights(name):
    base = tiny.model(32, seed=1, layers=2)
    embedding = moved_embedding(base.config.hidden_size)
    expected = per_sequence(base, embedding)
    model = copy.deepcopy(base)
    layout = LAYOUTS[name]
    if layout.get("padding_free") or layout.get("prefix_sharing"):
        use_padding_free(model, prefix_sharing=layout.get("prefix_sharing", False))
    batch = concatenated_inputs(PROMPTS, CHOSEN, REJECTED, pad_token_id=0, **layout)
    with applied(model.get_input_embeddings(), embedding, token_weights(batch, PAIR_WEIGHTS)):
        values = sequence_logps(model, num_sequences=8, **batch)
    assert torch.allclose(values, expected, atol=1e-5), (name, values, expected)
    unconditioned = sequence_logps(model, num_sequences=8, **batch)
    assert (values - unconditioned).abs().max() > 1e-2  # the moved embedding does change the log-probs


@pytest.fixture(scope="module", params=["full", "lora"])
def trained(tmp_path_factory, request):
    """A conditioned model trained a few steps with `conditioning: embedding` (all weights, or a LoRA adapter),
    saving a checkpoint on the way."""
    folder = tmp_path_factory.mktemp(f"embedding_{request.param}")
    tok = tiny.tokenizer()
    rows = [{"prompt": "hello", "chosen": "good answer", "rejected": "bad", "chosen_m": 1.0, "rejected_m": 0.0},
            {"prompt": "how", "chosen": "fine", "rejected": "bad answer", "chosen_m": 0.0, "rejected_m": 1.0}] * 4
    data = Dataset.from_list([{**r, "chosen_margins": [r["chosen_m"]], "rejected_margins": [r["rejected_m"]]}
                              for r in rows]).remove_columns(["chosen_m", "rejected_m"])
    args = MODPOConfig(output_dir=str(folder / "run"), weights=[0.5, 0.5], weight_sampling="dirichlet",
                       conditioning="embedding", max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2,
                       report_to=[], save_strategy="steps", save_steps=2, use_cpu=True, seed=0, max_length=16,
                       cache_dir=str(folder / "cache"), disable_tqdm=True)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    base = tiny.save(tiny.model(len(tok), seed=0), tok, folder / "base")  # a folder: an adapter names its base
    trainer = MODPOTrainer(base, args=args, train_dataset=data, processing_class=tok,
                           peft_config=lora if request.param == "lora" else None)
    trainer.train()
    trainer.save_model(str(folder / "model"))
    tok.save_pretrained(str(folder / "model"))
    return folder, trainer  # the folder's conditioning record (modpo.conditioning.RECORD_FILE) is all steering reads


def test_the_embedding_trains_and_is_saved_beside_the_model(trained):
    folder, trainer = trained
    assert trainer.weight_embedding.outer.weight.abs().sum() > 0  # it left zero: the policy learned to use w
    model_dir = folder / "model"
    assert (model_dir / WEIGHTS_FILE).exists() and (model_dir / CONFIG_FILE).exists()
    weights_file = "adapter_model.safetensors" if (model_dir / "adapter_model.safetensors").exists() else "model.safetensors"
    assert not any("modpo_weight_embedding" in k for k in load_file(str(model_dir / weights_file)))
    saved = WeightEmbedding.load(model_dir)
    for key, value in trainer.weight_embedding.state_dict().items():
        assert torch.equal(saved.state_dict()[key], value.cpu())
    checkpoint = folder / "run" / "checkpoint-2"  # checkpoints carry it too (resuming reads it back)
    assert (checkpoint / WEIGHTS_FILE).exists()
    assert not any("modpo_weight_embedding" in k for k in load_file(str(checkpoint / weights_file)))
    assert trainer.conditioner.record()["format"] == "embedding"


def test_steering_shows_the_saved_embedding(trained):
    folder, trainer = trained
    model_dir = folder / "model"
    model = load_model(str(model_dir))
    policy = trainer.model.cpu()
    ids = torch.tensor([[5, 6, 7]])
    for w in ([0.2, 0.8], [0.9, 0.1]):
        with steering(model_dir, model, None, w) as prefix:
            steered = model(input_ids=ids).logits
        with applied(policy.get_input_embeddings(), trainer.weight_embedding, torch.tensor([[w]])):
            expected = policy(input_ids=ids).logits
        assert prefix == [] and torch.allclose(steered, expected, atol=1e-5)
    plain = model(input_ids=ids).logits
    assert not torch.allclose(steered, plain, atol=1e-4)  # the hook is gone after the block, and it mattered


def test_resuming_reads_the_checkpoints_embedding(trained):
    folder, trainer = trained
    checkpoint = folder / "run" / "checkpoint-2"
    before = {k: v.clone() for k, v in trainer.weight_embedding.state_dict().items()}
    trainer.load_weight_embedding(str(checkpoint))
    saved = WeightEmbedding.load(checkpoint).state_dict()
    assert all(torch.equal(trainer.weight_embedding.state_dict()[k], saved[k]) for k in saved)
    assert any(not torch.equal(before[k], saved[k]) for k in saved)  # step 2 differs from step 4
