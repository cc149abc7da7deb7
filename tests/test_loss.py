"""modpo_loss against an independent float64 implementation of the MODPO formula, and against TRL's DPO."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from modpo import modpo_loss, validate_weights

import tiny


# ------------------------------------------------------------------------ an independent reference, in Python floats

def log_sigmoid(x: float) -> float:
    """log(1 / (1 + exp(-x))), stable for large |x|."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference_logit(pc, pr, rc, rr, mc, mr, weights, beta) -> float:
    """z = (1/w0) [beta((pc - rc) - (pr - rr)) - sum_k w_k (mc_k - mr_k)], k = 1..K-1."""
    weighted = sum(w * (c - r) for w, c, r in zip(weights[1:], mc, mr))
    return (beta * ((pc - rc) - (pr - rr)) - weighted) / weights[0]


def reference_loss(z: float, loss_type: str, eps: float) -> float:
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    return max(0.0, 1.0 - z)


def random_inputs(batch: int, num_objectives: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logps = [(-20 * torch.rand(batch, generator=g, dtype=torch.float64)) for _ in range(4)]
    margins = [torch.randn(batch, num_objectives - 1, generator=g, dtype=torch.float64) * 3 for _ in range(2)]
    raw = torch.rand(num_objectives, generator=g, dtype=torch.float64) + 0.05
    weights = (raw / raw.sum()).tolist()
    return logps, margins, weights


CASES = [(k, loss_type, eps, beta) for k in (1, 2, 4) for loss_type, eps in (("sigmoid", 0.0), ("sigmoid", 0.2),
                                                                               ("hinge", 0.0)) for beta in (0.1, 1.7)]


@pytest.mark.parametrize("num_objectives, loss_type, eps, beta", CASES)
def test_loss_matches_independent_formula(num_objectives, loss_type, eps, beta):
    batch = 16
    (pc, pr, rc, rr), (mc, mr), weights = random_inputs(batch, num_objectives, seed=num_objectives * 7 + int(beta * 10))
    losses, chosen_rewards, rejected_rewards = modpo_loss(pc, pr, rc, rr, mc, mr, weights, beta=beta,
                                                          label_smoothing=eps, loss_type=loss_type)
    assert losses.dtype == torch.float64 and losses.shape == (batch,)
    expected = [reference_loss(reference_logit(pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(),
                                               mc[i].tolist(), mr[i].tolist(), weights, beta), loss_type, eps)
                for i in range(batch)]
    assert torch.allclose(losses, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    # The rewards are beta * log(pi / pi_ref), whatever the weights.
    assert torch.allclose(chosen_rewards, torch.tensor([beta * (pc[i].item() - rc[i].item()) for i in range(batch)],
                                                       dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(rejected_rewards, torch.tensor([beta * (pr[i].item() - rr[i].item()) for i in range(batch)],
                                                         dtype=torch.float64), rtol=0, atol=1e-12)
    # The hinge case is not vacuous: some pairs are inside the margin and some are past it.
    if loss_type == "hinge" and beta > 1:
        assert (losses > 0).any() and (losses == 0).any()


def test_margins_none_is_k_equals_one():
    (pc, pr, rc, rr), _, _ = random_inputs(8, 1, seed=3)
    with_none = modpo_loss(pc, pr, rc, rr, None, None, [1.0], beta=0.3)[0]
    empty = torch.zeros(8, 0, dtype=torch.float64)
    with_empty = modpo_loss(pc, pr, rc, rr, empty, empty, [1.0], beta=0.3)[0]
    assert torch.equal(with_none, with_empty)


@pytest.mark.parametrize("num_objectives", [1, 2, 4])
@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_unit_first_weight_is_dpo(num_objectives, eps):
    """w = (1, 0, ..., 0): the margins drop out and the loss is (conservative) DPO, whatever the margins are."""
    beta = 0.5
    (pc, pr, rc, rr), (mc, mr), _ = random_inputs(12, num_objectives, seed=11 + num_objectives)
    weights = [1.0] + [0.0] * (num_objectives - 1)
    losses = modpo_loss(pc, pr, rc, rr, mc, mr, weights, beta=beta, label_smoothing=eps)[0]
    for i in range(12):
        h = beta * ((pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item()))
        dpo = -(1 - eps) * math.log(1 / (1 + math.exp(-h))) - eps * math.log(1 / (1 + math.exp(h)))
        assert abs(losses[i].item() - dpo) < 1e-12


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0)])
def test_gradient_matches_analytic(loss_type, eps):
    beta, num_objectives = 0.8, 3
    (pc, pr, rc, rr), (mc, mr), weights = random_inputs(10, num_objectives, seed=5)
    pc, pr = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    losses = modpo_loss(pc, pr, rc, rr, mc, mr, weights, beta=beta, label_smoothing=eps, loss_type=loss_type)[0]
    losses.sum().backward()
    w0 = weights[0]
    for i in range(10):
        z = reference_logit(pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(), mc[i].tolist(), mr[i].tolist(),
                            weights, beta)
        if loss_type == "sigmoid":
            sig = lambda x: 1 / (1 + math.exp(-x))
            dloss_dz = -(1 - eps) * sig(-z) + eps * sig(z)
        else:
            dloss_dz = -1.0 if z < 1 else 0.0
        assert abs(pc.grad[i].item() - dloss_dz * beta / w0) < 1e-12
        assert abs(pr.grad[i].item() + dloss_dz * beta / w0) < 1e-12


def test_reference_and_margins_get_no_gradient_through_rewards():
    (pc, pr, rc, rr), (mc, mr), weights = random_inputs(4, 2, seed=9)
    pc.requires_grad_(True)
    _, chosen_rewards, rejected_rewards = modpo_loss(pc, pr, rc, rr, mc, mr, weights)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_bf16_inputs_are_computed_in_fp32():
    (pc, pr, rc, rr), (mc, mr), weights = random_inputs(6, 2, seed=1)
    to = lambda t: t.to(torch.bfloat16)
    losses = modpo_loss(to(pc), to(pr), to(rc), to(rr), to(mc), to(mr), weights, beta=0.2)[0]
    assert losses.dtype == torch.float32
    expected = [reference_loss(reference_logit(to(pc)[i].item(), to(pr)[i].item(), to(rc)[i].item(), to(rr)[i].item(),
                                               to(mc)[i].tolist(), to(mr)[i].tolist(), weights, 0.2), "sigmoid", 0.0)
                for i in range(6)]
    assert torch.allclose(losses.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)


# ------------------------------------------------------------------------------------------------- bad input

def _call(weights=(0.5, 0.5), beta=0.1, loss_type="sigmoid", chosen_margins=None, rejected_margins=None, eps=0.0):
    (pc, pr, rc, rr), (mc, mr), _ = random_inputs(3, 2, seed=0)
    mc = mc if chosen_margins is None else chosen_margins
    mr = mr if rejected_margins is None else rejected_margins
    return modpo_loss(pc, pr, rc, rr, mc, mr, list(weights), beta=beta, label_smoothing=eps, loss_type=loss_type)


@pytest.mark.parametrize("kwargs, words", [
    ({"weights": (float("nan"), 0.5)}, ["weights[0]", "not finite"]),
    ({"weights": (0.5, float("inf"))}, ["weights[1]", "not finite"]),
    ({"weights": (1.2, -0.2)}, ["weights[1]", "negative"]),
    ({"weights": (0.0, 1.0)}, ["weights[0]", "> 0"]),
    ({"weights": (-0.5, 1.5)}, ["weights[0]", "negative"]),
    ({"weights": (0.5, 0.3, 0.2)}, ["3 entries", "2 objectives"]),
    ({"weights": (1.0,)}, ["1 entries", "2 objectives"]),
    ({"weights": ()}, ["empty"]),
    ({"loss_type": "ipo"}, ["loss_type", "ipo"]),
    ({"beta": 0.0}, ["beta", "> 0"]),
    ({"beta": -1.0}, ["beta", "> 0"]),
    ({"beta": float("nan")}, ["beta"]),
    ({"eps": 0.5}, ["label_smoothing"]),
    ({"chosen_margins": torch.zeros(3, 2, dtype=torch.float64)}, ["chosen_margins", "rejected_margins", "shape"]),
    ({"chosen_margins": torch.zeros(3, dtype=torch.float64),
      "rejected_margins": torch.zeros(3, dtype=torch.float64)}, ["chosen_margins", "shape"]),
])
def test_bad_input_raises_value_error_naming_the_problem(kwargs, words):
    with pytest.raises(ValueError) as error:
        _call(**kwargs)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_validate_weights_returns_floats():
    assert validate_weights(torch.tensor([0.25, 0.75])) == [0.25, 0.75]
    assert validate_weights([1, 0], num_objectives=2) == [1.0, 0.0]


def test_margins_batch_must_match_logps():
    one = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(ValueError):
        modpo_loss(one, one, one, one, torch.ones(3, 1, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64),
                   [0.5, 0.5])


# --------------------------------------------------------------------------------------------- TRL as an oracle

def _trl_rows():
    """Rows TRL and modpo tokenize identically with the word tokenizer: TRL joins prompt + completion as strings
    and appends the eos *string*, so completions start with a space and already end with ' <eos>'."""
    return [{"prompt": r["prompt"], "chosen": " " + r["chosen"] + " <eos>", "rejected": " " + r["rejected"] + " <eos>"}
            for r in tiny.rows(6, seed=21)]


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_weights_one_equals_trl_dpo(tmp_path, loss_type):
    """What was compared: TRL 1.16's DPOTrainer and MODPOTrainer(weights=[1.0]) get the same policy (a perturbed
    copy of the reference), the same explicit reference model, the same 6 rows and beta. Both precompute the
    reference log-probs (compared row by row), then the loss of one batch holding all 6 rows is computed by each
    trainer's own compute_loss (TRL: DPOTrainer._compute_loss with its fused LM head; modpo: sequence_logps +
    modpo_loss). The batch mean does not depend on the order the dataloaders shuffle the rows into."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from modpo import MODPOConfig, MODPOTrainer

    tok = tiny.tokenizer()
    reference = tiny.model(len(tok), seed=4, layers=2)
    policy = tiny.perturbed(reference, seed=5, scale=0.2)
    data = Dataset.from_list(_trl_rows())
    beta = 0.7
    common = dict(bf16=False, report_to=[], use_cpu=True, per_device_train_batch_size=len(data),
                  per_device_eval_batch_size=len(data), max_length=64, save_strategy="no", seed=0)

    trl_args = DPOConfig(output_dir=str(tmp_path / "trl"), gradient_checkpointing=False, beta=beta,
                         loss_type=[loss_type], precompute_ref_log_probs=True, **common)
    trl = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=trl_args,
                     train_dataset=data, processing_class=tok)
    modpo_args = MODPOConfig(output_dir=str(tmp_path / "modpo"), weights=[1.0], beta=beta, loss_type=loss_type,
                             **common)
    ours = MODPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=modpo_args,
                        train_dataset=data, processing_class=tok)

    # Same tokens, same reference log-probs.
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert trl.train_dataset[column] == ours.train_dataset[column]
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert torch.allclose(torch.tensor(trl.train_dataset[column]), torch.tensor(ours.train_dataset[column]),
                              atol=1e-5)

    losses = []
    for trainer in (trl, ours):
        trainer.model.eval()
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, batch).item())
    trl_loss, modpo_loss_value = losses
    if loss_type == "sigmoid":
        assert abs(trl_loss - math.log(2)) > 1e-3, "policy equals the reference: the comparison would be vacuous"
    assert abs(trl_loss - modpo_loss_value) < 1e-5, losses
