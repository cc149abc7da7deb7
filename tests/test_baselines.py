"""The baselines of the comparison: soups, DPO LW, Best-of-N, MORLHF, and the comparison's aggregation.

Each test recomputes what it checks by a route independent of the code under test (plain forward passes
and log-softmax, explicit LoRA products B @ A, a hand-written 2-D hypervolume).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import tiny

BETA = 0.1


def plain_logp(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """log pi(response | prompt) by one unbatched forward pass and a full log-softmax."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logps = F.log_softmax(logits, dim=-1)
    start = len(prompt_ids)
    return float(sum(logps[t - 1, ids[0, t]] for t in range(start, ids.shape[1])))


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ soups


def test_soup_of_full_models_is_the_weighted_average_of_parameters(tmp_path):
    from transformers import AutoModelForCausalLM

    from modpo.baselines.soups import make_soup, soup_model

    tok = tiny.tokenizer()
    a, b = tiny.model(len(tok), seed=1), tiny.model(len(tok), seed=2)
    expected = {name: 0.3 * pa.detach().double() + 0.7 * b.state_dict()[name].double()
                for name, pa in a.state_dict().items()}
    soup = soup_model([a, b], [0.3, 0.7])
    for name, value in soup.state_dict().items():
        torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6)
    # The inputs are untouched.
    assert not torch.equal(a.state_dict()["model.embed_tokens.weight"], soup.state_dict()["model.embed_tokens.weight"])

    folder = make_soup([tiny.save(a, tok, tmp_path / "a"), tiny.save(b, tok, tmp_path / "b")], [0.3, 0.7],
                       tmp_path / "soup")
    saved = AutoModelForCausalLM.from_pretrained(str(folder))
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6)
    record = json.loads((folder / "modpo_run.json").read_text())
    assert record["weights"] == [0.3, 0.7] and record["stage"] == "soup"


def test_soup_of_lora_adapters_interpolates_the_merged_deltas(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from modpo.baselines.soups import make_soup

    tok = tiny.tokenizer()
    base_dir = tiny.save(tiny.model(len(tok), seed=0), tok, tmp_path / "base")
    r, alpha, targets = 2, 8, ["q_proj", "v_proj"]
    adapters, deltas = [], []
    for seed in (11, 12):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                               LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
        state = model.state_dict()
        delta = {}
        for key, value in state.items():
            if "lora_A" in key:
                a = value.double()
                b = state[key.replace("lora_A", "lora_B")].double()
                module = key.split("base_model.model.", 1)[1].split(".lora_A")[0]
                delta[module + ".weight"] = (b @ a) * (alpha / r)
        assert delta and all(d.abs().sum() > 0 for d in delta.values())
        folder = tmp_path / f"adapter{seed}"
        model.save_pretrained(str(folder))
        adapters.append(str(folder))
        deltas.append(delta)

    w = [0.25, 0.75]
    soup = AutoModelForCausalLM.from_pretrained(str(make_soup(adapters, w, tmp_path / "soup", tokenizer_from=base_dir)))
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    checked = 0
    for name, value in soup.state_dict().items():
        expected = base[name].double()
        if name in deltas[0]:
            expected = expected + w[0] * deltas[0][name] + w[1] * deltas[1][name]
            checked += 1
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
    assert checked == 2  # q_proj and v_proj of the single layer


# ------------------------------------------------------------------------------------------------ DPO LW


def test_dpo_lw_rows_carry_their_objective_weight_and_scale_the_loss_exactly(tmp_path):
    from datasets import Dataset

    from modpo.baselines.dpo_lw import union_rows
    from modpo.config import MODPOConfig
    from modpo.trainer import MODPOTrainer

    tok = tiny.tokenizer()
    reference = tiny.model(len(tok), seed=0)
    policy = tiny.perturbed(reference, seed=5, scale=0.2)
    sets = {"helpful": tiny.rows(3, seed=1), "harmless": tiny.rows(3, seed=2)}
    rows = union_rows(sets, {"helpful": 0.3, "harmless": 0.7})
    assert [r["loss_weight"] for r in rows] == [0.3] * 3 + [0.7] * 3
    assert [r["objective"] for r in rows] == ["helpful"] * 3 + ["harmless"] * 3

    args = MODPOConfig(output_dir=str(tmp_path / "out"), weights=[1.0], beta=BETA, append_eos=False, report_to=[],
                       use_cpu=True, max_length=32, cache_dir=str(tmp_path / "cache"))
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected", "loss_weight")} for r in rows])
    trainer = MODPOTrainer(policy, ref_model=reference, args=args, train_dataset=data, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    loss = trainer.compute_loss(trainer.model, batch)

    expected, unweighted = [], []
    for r in rows:
        p = ids_of(tok, r["prompt"])
        c, j = ids_of(tok, r["chosen"]), ids_of(tok, r["rejected"])
        z = BETA * ((plain_logp(policy, p, c) - plain_logp(reference, p, c))
                    - (plain_logp(policy, p, j) - plain_logp(reference, p, j)))
        pair_loss = -F.logsigmoid(torch.tensor(z, dtype=torch.float64)).item()
        expected.append(r["loss_weight"] * pair_loss)
        unweighted.append(pair_loss)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert abs(sum(unweighted) / len(unweighted) - loss.item()) > 1e-3  # the weights did change the loss


# ------------------------------------------------------------------------------------------------ Best-of-N


def test_best_of_n_picks_the_argmax_of_weighted_implicit_rewards():
    from modpo.baselines.best_of_n import select_best
    from modpo.baselines.rewards import ImplicitRewards

    tok = tiny.tokenizer()
    reference = tiny.model(len(tok), seed=0)
    helpful, harmless = tiny.perturbed(reference, seed=1, scale=0.3), tiny.perturbed(reference, seed=2, scale=0.3)
    n = 4
    candidates = [{"prompt": "p0", "response": t} for t in ("a b", "c d", "e f g", "h")] + \
                 [{"prompt": "p1 p2", "response": t} for t in ("a", "b c", "d d d", "g h")]
    rewards = ImplicitRewards({"helpful": helpful, "harmless": harmless}, reference, tokenizer=tok, beta=BETA)
    scores = rewards.score([c["prompt"] for c in candidates], [c["response"] for c in candidates])

    independent = []
    for c in candidates:
        p, y = ids_of(tok, c["prompt"]), ids_of(tok, c["response"])
        ref = plain_logp(reference, p, y)
        independent.append([BETA * (plain_logp(helpful, p, y) - ref), BETA * (plain_logp(harmless, p, y) - ref)])
    torch.testing.assert_close(scores.double(), torch.tensor(independent, dtype=torch.float64), rtol=0, atol=1e-5)
    tokens = sum(len(ids_of(tok, c["prompt"])) + len(ids_of(tok, c["response"])) for c in candidates)
    assert rewards.forward_tokens == 3 * tokens  # the reference and both DPO models, once each

    picks = set()
    for w in ([1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [0.8, 0.2]):
        chosen = select_best(candidates, scores, n, w)
        for g in range(2):
            values = [w[0] * independent[g * n + j][0] + w[1] * independent[g * n + j][1] for j in range(n)]
            best = max(range(n), key=lambda j: values[j])
            assert chosen[g] is candidates[g * n + best]
            picks.add((g, best))
    assert len(picks) > 2  # different weights pick different candidates: the test exercises the weighting


def test_best_of_n_on_a_fixed_reward_table():
    from modpo.baselines.best_of_n import best_of_n_indices

    table = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.6]],
                          [[0.2, 0.9], [0.5, 0.1], [0.4, 0.4]]])
    assert best_of_n_indices(table, [1.0, 0.0]).tolist() == [0, 1]
    assert best_of_n_indices(table, [0.0, 1.0]).tolist() == [1, 0]
    assert best_of_n_indices(table, [0.5, 0.5]).tolist() == [2, 0]


# ------------------------------------------------------------------------------------------------ MORLHF


def test_morlhf_runs_two_rloo_steps_and_counts_tokens(tmp_path):
    from modpo.baselines.morlhf import MORLHFSettings, train_morlhf
    from modpo.baselines.rewards import ImplicitRewards

    tok = tiny.tokenizer()
    reference = tiny.model(len(tok), seed=0)
    sft = tiny.save(reference, tok, tmp_path / "sft")
    rewards = ImplicitRewards({"helpful": tiny.perturbed(reference, seed=1, scale=0.3),
                               "harmless": tiny.perturbed(reference, seed=2, scale=0.3)}, sft, beta=BETA)
    settings = MORLHFSettings(steps=2, prompts_per_step=2, generations=2, learning_rate=1e-3,
                              max_completion_length=3, min_new_tokens=3)
    out = train_morlhf(sft, rewards, ["p0", "p1", "p2", "p3"], [0.4, 0.6], tmp_path / "rl", settings)
    record = json.loads((out / "modpo_run.json").read_text())
    counts, detail = record["token_counts"], record["token_detail"]
    sequences = settings.steps * settings.prompts_per_step * settings.generations
    per_sequence = 1 + 3  # one-word prompt + exactly 3 generated tokens
    assert detail["generation_forward"] == sequences * per_sequence
    assert detail["train_forward_backward"] == sequences * per_sequence == counts["backward"]
    assert detail["logprob_forward"] == 2 * sequences * per_sequence  # old policy and reference
    assert 0 < detail["reward_forward"] <= 3 * sequences * per_sequence
    assert counts["forward"] == (detail["generation_forward"] + detail["train_forward_backward"]
                                 + detail["logprob_forward"] + detail["reward_forward"])
    assert record["log_history"][-1]["step"] == 2
    assert (out / "config.json").exists()
    # A finished run is reused, not redone.
    assert train_morlhf(sft, rewards, ["p0", "p1", "p2", "p3"], [0.4, 0.6], tmp_path / "rl", settings) == out
    assert json.loads((out / "modpo_run.json").read_text())["wall_seconds"] == record["wall_seconds"]


# ------------------------------------------------------------------------------------------------ comparison report


def _point(name, weights, helpful, harmless):
    return {"name": name, "weights": weights, "n": 10, "malformed": 0,
            "helpful": {"mean": helpful, "stderr": 0.01}, "harmless": {"mean": harmless, "stderr": 0.01}}


def hypervolume_2d(points: list[tuple[float, float]], ref=(0.0, 0.0)) -> float:
    """Area dominated by 2-D points (maximisation) above `ref`: sweep by x descending."""
    area, best_y = 0.0, ref[1]
    for x, y in sorted(points, reverse=True):
        if y > best_y:
            area += (x - ref[0]) * (y - best_y)
            best_y = y
    return area


def test_comparison_report_hypervolume_matches_an_independent_recomputation(tmp_path):
    from modpo.experiments.compare_report import write_comparison

    records = {
        "modpo": {"label": "MODPO", "prerequisites": ["harmless_dpo"], "points": [
            _point("w0.1_0.9", [0.1, 0.9], 0.45, 0.72), _point("w0.5_0.5", [0.5, 0.5], 0.66, 0.5),
            _point("w0.9_0.1", [0.9, 0.1], 0.7, 0.38)],
            "compute": {"wall_seconds": 10.0, "device": "cpu", "tokens": {"forward": 100, "backward": 80}}},
        "soups": {"label": "DPO soups", "prerequisites": ["helpful_dpo", "harmless_dpo"], "points": [
            _point("w0.1_0.9", [0.1, 0.9], 0.4, 0.6), _point("w0.5_0.5", [0.5, 0.5], 0.5, 0.55),
            _point("w0.9_0.1", [0.9, 0.1], 0.45, 0.5)],  # the last is dominated by the middle one
            "compute": {"wall_seconds": 1.0, "device": "cpu", "tokens": {"forward": 0, "backward": 0}}},
    }
    shared = {"sft": {"what": "sft", "wall_seconds": 5.0, "tokens": {"forward": 7, "backward": 7}},
              "harmless_dpo": {"what": "dpo", "wall_seconds": 3.0, "tokens": {"forward": 50, "backward": 40}},
              "helpful_dpo": {"what": "dpo", "wall_seconds": 4.0, "tokens": {"forward": 60, "backward": 40}}}
    meta = {"weights": [0.1, 0.5, 0.9], "evaluator": "exact", "num_prompts": 2, "device": "cpu",
            "sampling": {"samples_per_prompt": 5, "temperature": 1.0}}
    write_comparison(tmp_path, records, shared, meta, [0.0, 0.0])

    document = json.loads((tmp_path / "comparison.json").read_text())
    assert document["reference_point"] == [0.0, 0.0]
    for method, data in document["methods"].items():
        points = [(p["helpful"]["mean"], p["harmless"]["mean"]) for p in data["points"]]
        summary = document["summary"][method]
        assert summary["hypervolume"] == pytest.approx(hypervolume_2d(points), abs=1e-12)
        dominated = [i for i, (x, y) in enumerate(points)
                     if any(a >= x and b >= y and (a, b) != (x, y) for a, b in points)]
        assert len(summary["non_dominated"]) == len(points) - len(dominated)
    # By hand: MODPO 0.7*0.38 + 0.66*(0.5-0.38) + 0.45*(0.72-0.5); soups 0.5*0.55 + 0.4*(0.6-0.55).
    assert document["summary"]["modpo"]["hypervolume"] == pytest.approx(0.266 + 0.0792 + 0.099)
    assert document["summary"]["soups"]["hypervolume"] == pytest.approx(0.275 + 0.02)
    assert document["summary"]["soups"]["non_dominated"] == ["w0.1_0.9", "w0.5_0.5"]
    assert document["summary"]["soups"]["total_tokens"] == {"forward": 110, "backward": 80}
    assert document["summary"]["modpo"]["total_tokens"] == {"forward": 150, "backward": 120}
    assert document["summary"]["modpo"]["total_wall_seconds"] == pytest.approx(13.0)
    rows = (tmp_path / "comparison.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6
    markdown = (tmp_path / "comparison.md").read_text()
    assert "reference point [0, 0]" in markdown and "DPO soups" in markdown
    assert (tmp_path / "comparison.png").stat().st_size > 0
