"""Margin reward sources, checked against direct computations, and their content-keyed cache."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from modpo.errors import DataError
from modpo.margins import (
    CallableMargins,
    ColumnMargins,
    ImplicitRewardMargins,
    MarginSource,
    RewardModelMargins,
    compute_margin_rewards,
    length_penalty,
    length_penalty_per,
)

import tiny


def column_rows(n=5, seed=0):
    rows = tiny.rows(n, seed=seed)
    for i, row in enumerate(rows):
        row.update(help_c=0.5 * i, help_r=-0.25 * i, safe_c=float(i % 3), safe_r=1.0 - i)
    return rows


def logp_by_hand(model, prompt_ids, response_ids) -> float:
    """log pi(response | prompt) of one unpadded sequence, from the model's logits."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(log_probs[t - 1, ids[0, t]].item() for t in range(len(prompt_ids), ids.shape[1]))


class Counting(MarginSource):
    """Delegates to `inner`, counting score() calls."""

    def __init__(self, inner: MarginSource):
        self.inner, self.calls = inner, 0
        self.name, self.num_objectives = inner.name, inner.num_objectives
        if hasattr(inner, "columns"):
            self.columns = inner.columns

    def identity(self):
        return self.inner.identity()

    def score(self, dataset, side):
        self.calls += 1
        return self.inner.score(dataset, side)


# ------------------------------------------------------------------------------------------------ columns

def test_column_margins():
    rows = column_rows()
    data = Dataset.from_list(rows)
    source = ColumnMargins(["help_c", "safe_c"], ["help_r", "safe_r"])
    assert source.num_objectives == 2
    for side, columns in (("chosen", ("help_c", "safe_c")), ("rejected", ("help_r", "safe_r"))):
        scores = source.score(data, side)
        assert scores.shape == (len(rows), 2) and scores.dtype == torch.float32
        assert scores.tolist() == [[r[columns[0]], r[columns[1]]] for r in rows]


def test_column_margins_bad_input():
    with pytest.raises(ValueError):
        ColumnMargins(["a", "b"], ["c"])
    with pytest.raises(ValueError):
        ColumnMargins([], [])
    rows = column_rows()
    rows[3]["safe_r"] = float("nan")
    data = Dataset.from_list(rows)
    with pytest.raises(DataError) as error:
        ColumnMargins(["help_c", "safe_c"], ["help_r", "safe_r"]).score(data, "rejected")
    assert "row 4" in str(error.value) and "'safe_r'" in str(error.value)
    with pytest.raises(DataError) as error:
        ColumnMargins(["nope"], ["help_r"]).score(data, "chosen")
    assert "'nope'" in str(error.value) and "not found" in str(error.value)


# ------------------------------------------------------------------------------------------------ callables

def test_length_penalty_and_callables():
    rows = tiny.rows(6, seed=4)
    rows.append({"prompt": [{"role": "user", "content": "p0"}], "chosen": [{"role": "assistant", "content": "a b c"}],
                 "rejected": [{"role": "assistant", "content": "d"}]})
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows[:6]])
    scores = CallableMargins(length_penalty).score(data, "rejected")
    assert scores.shape == (6, 1)
    assert scores[:, 0].tolist() == [-float(len(r["rejected"].split())) for r in rows[:6]]
    assert length_penalty(rows[6]["prompt"], rows[6]["chosen"]) == -3.0

    two = CallableMargins(lambda p, r: [len(p), -len(r)], name="two", num_objectives=2)
    assert two.score(data, "chosen").tolist() == [[float(len(r["prompt"])), -float(len(r["chosen"]))] for r in rows[:6]]


@pytest.mark.parametrize("returned", [[1.0, 2.0], math.nan, math.inf, []])
def test_callable_bad_return_is_a_data_error(returned):
    data = Dataset.from_list(tiny.rows(3))
    with pytest.raises(DataError) as error:
        CallableMargins(lambda p, r: returned, name="bad_fn").score(data, "chosen")
    assert "row 1" in str(error.value) and "'chosen'" in str(error.value) and "bad_fn" in str(error.value)


@pytest.mark.parametrize("returned", [None, "x"])
def test_callable_non_numeric_return_is_a_data_error(returned):
    data = Dataset.from_list(tiny.rows(3))
    with pytest.raises(DataError):
        CallableMargins(lambda p, r: returned, name="bad_fn").score(data, "chosen")


# ------------------------------------------------------------------------------------------------ reward model

@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    tok = tiny.tokenizer(chat=True)
    model = tiny.model(len(tok), seed=7, num_labels=3)
    return tiny.save(model, tok, tmp_path_factory.mktemp("rm")), model, tok


def reward_rows():
    rows = [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
            for r in tiny.rows(4, seed=8)]
    rows.append({"prompt": [{"role": "user", "content": "p1 p2"}], "chosen": [{"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "assistant", "content": "b c d e f"}]})
    return rows


def test_reward_model_by_path_equals_a_direct_forward(reward_model_dir):
    path, model, tok = reward_model_dir
    rows = reward_rows()
    source = RewardModelMargins(path, outputs=[0, 2], batch_size=2)
    assert source.num_objectives == 2
    assert source.describe() == f"reward_model ({path}, outputs [0, 2])"  # reports tell evaluators apart
    model.eval()
    for side in ("chosen", "rejected"):
        data = Dataset.from_list(rows[:4])
        scores = source.score(data, side)
        assert scores.shape == (4, 2)
        for i, row in enumerate(rows[:4]):
            with torch.no_grad():
                # as TRL's RewardTrainer trains on text rows: prompt + response + eos
                sequence = tok(row["prompt"])["input_ids"] + tok(row[side], add_special_tokens=False)["input_ids"]
                logits = model(torch.tensor([sequence + [tok.eos_token_id]])).logits[0]
            assert torch.allclose(scores[i], logits[[0, 2]], atol=1e-5), (i, side)
    # A chat row is rendered with the chat template.
    chat = rows[4]
    text = tok.apply_chat_template(chat["prompt"] + chat["rejected"], tokenize=False)
    with torch.no_grad():
        expected = model(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, [0, 2]]
    assert torch.allclose(source.score(Dataset.from_list([chat]), "rejected")[0], expected, atol=1e-5)


@pytest.mark.parametrize("outputs", [[3], [0, 5], [-1]])
def test_reward_model_wrong_output_names_the_count(reward_model_dir, outputs):
    path, _, _ = reward_model_dir
    with pytest.raises(ValueError) as error:
        RewardModelMargins(path, outputs=outputs)
    assert "3 outputs" in str(error.value) and str([o for o in outputs if not 0 <= o < 3]) in str(error.value)


# ------------------------------------------------------------------------------------------------ implicit reward

def implicit_by_hand(policy, reference, tok, rows, side, beta):
    out = []
    for row in rows:
        prompt_ids = tok(row["prompt"])["input_ids"]
        response_ids = tok(row[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        policy_logp = logp_by_hand(policy, prompt_ids, response_ids)
        out.append(beta * (policy_logp - logp_by_hand(reference, prompt_ids, response_ids)))
    return torch.tensor(out, dtype=torch.float64)


def test_implicit_reward_with_a_reference_model():
    tok = tiny.tokenizer()
    reference = tiny.model(len(tok), seed=9).eval()
    policy = tiny.perturbed(reference, seed=10, scale=0.1).eval()
    rows = tiny.rows(5, seed=11)
    source = ImplicitRewardMargins(policy, ref_model=reference, tokenizer=tok, beta=0.5, batch_size=2)
    shared = ImplicitRewardMargins(policy, ref_model=reference, tokenizer=tok, beta=0.5, batch_size=2,
                                   prefix_sharing=True)
    both = shared.score_pairs(Dataset.from_list(rows))  # each prompt once per pair
    for side in ("chosen", "rejected"):
        scores = source.score(Dataset.from_list(rows), side)
        assert scores.shape == (5, 1) and both[side].shape == (5, 1)
        expected = implicit_by_hand(policy, reference, tok, rows, side, 0.5)
        assert expected.abs().max() > 1e-2  # policy and reference really differ
        assert torch.allclose(scores[:, 0].double(), expected, atol=1e-4)
        assert torch.allclose(both[side][:, 0].double(), expected, atol=1e-4)


def test_implicit_reward_needs_a_reference():
    tok = tiny.tokenizer()
    with pytest.raises(ValueError, match="ref_model"):
        ImplicitRewardMargins(tiny.model(len(tok)), tokenizer=tok)


def test_implicit_reward_of_a_lora_adapter_folder(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    tok = tiny.tokenizer()
    base_dir = tiny.save(tiny.model(len(tok), seed=12), tok, tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    reference = LlamaForCausalLM.from_pretrained(base_dir).eval()
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    peft_model.eval()
    adapter_dir = tiny.save(peft_model, tok, tmp_path / "adapter")

    source = ImplicitRewardMargins(adapter_dir, beta=0.3, batch_size=3)
    assert hasattr(source.model, "disable_adapter") and source.ref_model is None
    rows = tiny.rows(4, seed=14)
    scores = source.score(Dataset.from_list(rows), "chosen")[:, 0].double()
    expected = implicit_by_hand(peft_model, reference, tok, rows, "chosen", 0.3)
    assert expected.abs().max() > 1e-3  # the adapter is not a no-op
    assert torch.allclose(scores, expected, atol=1e-4)
    source.prefix_sharing = True  # both sides at once, the reference with the adapter disabled
    both = source.score_pairs(Dataset.from_list(rows))
    assert torch.allclose(both["chosen"][:, 0].double(), expected, atol=1e-4)
    expected_rejected = implicit_by_hand(peft_model, reference, tok, rows, "rejected", 0.3)
    assert torch.allclose(both["rejected"][:, 0].double(), expected_rejected, atol=1e-4)


def test_implicit_reward_cache_key_covers_the_tokenizer(tmp_path):
    tok_a = tiny.tokenizer(chat=True)
    tok_b = tiny.tokenizer(chat=True)
    tok_b.chat_template = "<system> p3 " + tiny.CHAT_TEMPLATE  # a different rendering of the same messages
    reference = tiny.model(len(tok_a), seed=15)
    policy = tiny.perturbed(reference, seed=16, scale=0.1)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in tiny.rows(3, seed=17)]
    data = Dataset.from_list(rows)
    source_b = ImplicitRewardMargins(policy, ref_model=reference, tokenizer=tok_b, beta=1.0)
    direct_b = source_b.score(data, "chosen")
    source_a = ImplicitRewardMargins(policy, ref_model=reference, tokenizer=tok_a, beta=1.0)
    compute_margin_rewards([source_a], data, tmp_path)
    cached_b, _ = compute_margin_rewards([source_b], data, tmp_path)
    assert torch.allclose(cached_b, direct_b, atol=1e-5)


# ------------------------------------------------------------------------------------ compute_margin_rewards

def test_compute_margin_rewards_concatenates_in_order_and_caches(tmp_path):
    rows = column_rows(6, seed=18)
    data = Dataset.from_list(rows)
    columns = Counting(ColumnMargins(["help_c", "safe_c"], ["help_r", "safe_r"]))
    length = Counting(CallableMargins(length_penalty))
    chosen, rejected = compute_margin_rewards([length, columns], data, tmp_path)
    assert chosen.shape == rejected.shape == (6, 3)
    for i, row in enumerate(rows):
        assert chosen[i].tolist() == [-float(len(row["chosen"].split())), row["help_c"], row["safe_c"]]
        assert rejected[i].tolist() == [-float(len(row["rejected"].split())), row["help_r"], row["safe_r"]]
    assert (length.calls, columns.calls) == (2, 2)  # once per side

    again = compute_margin_rewards([length, columns], data, tmp_path)
    assert (length.calls, columns.calls) == (2, 2)  # served from the cache
    assert torch.equal(again[0], chosen) and torch.equal(again[1], rejected)

    reordered = compute_margin_rewards([columns, length], data, tmp_path)  # still cached, in the new order
    assert torch.equal(reordered[0], chosen[:, [1, 2, 0]]) and (length.calls, columns.calls) == (2, 2)

    changed_text = [dict(r) for r in rows]
    changed_text[2]["chosen"] = changed_text[2]["chosen"] + " h h"
    chosen_2, _ = compute_margin_rewards([length, columns], Dataset.from_list(changed_text), tmp_path)
    assert (length.calls, columns.calls) == (4, 4)  # the data changed: both recompute
    assert chosen_2[2, 0].item() == chosen[2, 0].item() - 2

    changed_margin = [dict(r) for r in rows]
    changed_margin[5]["safe_r"] = 42.0  # a margin column, not the text
    _, rejected_3 = compute_margin_rewards([length, columns], Dataset.from_list(changed_margin), tmp_path)
    assert (length.calls, columns.calls) == (4, 6)  # only the column source reads that column
    assert rejected_3[5, 2].item() == 42.0


def test_compute_margin_rewards_default_cache_dir(tmp_path):
    data = Dataset.from_list(tiny.rows(3))
    source = Counting(CallableMargins(length_penalty))
    compute_margin_rewards([source], data)
    compute_margin_rewards([source], data)
    assert source.calls == 2 and len(list((tmp_path / "modpo-cache" / "margins").iterdir())) == 1


def test_callable_cache_key_covers_closure_values(tmp_path):
    def scaled(scale):
        return lambda prompt, response: scale * len(response.split())

    data = Dataset.from_list(tiny.rows(3, seed=19))
    compute_margin_rewards([CallableMargins(scaled(1.0), name="scaled")], data, tmp_path)
    chosen, _ = compute_margin_rewards([CallableMargins(scaled(10.0), name="scaled")], data, tmp_path)
    assert chosen[:, 0].tolist() == [10.0 * len(r["chosen"].split()) for r in tiny.rows(3, seed=19)]


WORD_WEIGHT = 2.0  # a global value a margin function reads: not visible in its code


def weighted_length(prompt, response) -> float:
    return WORD_WEIGHT * len(response.split())


class Scorer:
    def __init__(self, scale: float):
        self.scale = scale

    def score(self, prompt, response) -> float:
        return self.scale * len(response.split())

    def __call__(self, prompt, response) -> float:
        return self.score(prompt, response)


@pytest.mark.parametrize("fn", [weighted_length, Scorer(2.0).score, Scorer(2.0)], ids=["global", "method", "object"])
def test_callable_whose_code_does_not_decide_its_output_needs_a_version(fn):
    with pytest.raises(ValueError, match="pass version=") as error:
        CallableMargins(fn)
    assert "\n" not in str(error.value)
    assert CallableMargins(fn, version="1").identity()["version"] == "1"


def test_callable_version_keys_the_cache(tmp_path):
    rows = tiny.rows(4, seed=20)
    data = Dataset.from_list(rows)
    words = torch.tensor([[float(len(r["chosen"].split()))] for r in rows])
    first, _ = compute_margin_rewards([CallableMargins(Scorer(2.0), name="scorer", version="1")], data, tmp_path)
    second, _ = compute_margin_rewards([CallableMargins(Scorer(10.0), name="scorer", version="2")], data, tmp_path)
    assert torch.equal(first, 2.0 * words) and torch.equal(second, 10.0 * words)
    assert len(list((tmp_path / "margins").iterdir())) == 2
    keys = {CallableMargins(weighted_length, version=v).identity()["version"] for v in ("a", "b")}
    assert len(keys) == 2


def test_callables_reading_only_modules_and_functions_need_no_version():
    data = Dataset.from_list(tiny.rows(3, seed=21))
    log_length = CallableMargins(lambda p, r: math.log1p(len(r.split())), name="log_length")
    assert log_length.version is None and "captured" in log_length.identity()
    assert log_length.score(data, "chosen")[:, 0].tolist() == pytest.approx(
        [math.log1p(len(r.split())) for r in data["chosen"]])
    assert CallableMargins(length_penalty).identity()["name"] == "length_penalty"


def scoring_module(helper_body: str) -> dict:
    """A module of two functions, `margin` calling its helper `words`, as a user's scoring file would be."""
    namespace = {"__name__": "user_scoring"}
    exec("def words(prompt, response):\n"
         f"    return {helper_body}\n"
         "def margin(prompt, response):\n"
         "    return -words(prompt, response) / 2\n", namespace)
    return namespace


def test_callable_cache_key_covers_the_helpers_it_calls(tmp_path):
    """Editing a module-level helper the margin function calls changes its key, so no stale margin is reused."""
    data = Dataset.from_list(tiny.rows(4, seed=22))
    before, edited = scoring_module("len(response.split())"), scoring_module("len(response)")
    assert CallableMargins(before["margin"]).identity() != CallableMargins(edited["margin"]).identity()
    assert CallableMargins(before["margin"]).identity() == CallableMargins(scoring_module(
        "len(response.split())")["margin"]).identity()
    first, _ = compute_margin_rewards([CallableMargins(before["margin"])], data, tmp_path)
    second, _ = compute_margin_rewards([CallableMargins(edited["margin"])], data, tmp_path)
    assert second[:, 0].tolist() == [-len(r) / 2 for r in data["chosen"]]
    assert first[:, 0].tolist() == [-len(r.split()) / 2 for r in data["chosen"]]
    per = CallableMargins(length_penalty_per(100.0)).identity()  # the library's own: length_penalty is its helper
    assert list(per["helpers"]) == ["modpo.margins.length_penalty"]


def test_callable_cache_key_hashes_captured_values_by_content(tmp_path):
    """Captured values are keyed by their content: two large tensors that differ where `repr` elides them get two
    keys; equal content built twice (functions included) gets one; an object without a content form is refused."""
    def scaled_by(weights):
        return lambda prompt, response: float(weights[len(response.split())])

    first, second = torch.zeros(5000), torch.zeros(5000)
    second[2500] = 1.0
    assert repr(first) == repr(second)
    assert CallableMargins(scaled_by(first)).identity() != CallableMargins(scaled_by(second)).identity()

    def counting():
        def count(prompt, response):
            return float(len(response.split()))
        return count

    assert counting() is not counting()  # two function objects, at two addresses
    assert CallableMargins(scaled_by(counting())).identity() == CallableMargins(scaled_by(counting())).identity()

    class Opaque:
        pass

    with pytest.raises(ValueError, match="Opaque value, which has no stable content form; pass version=") as error:
        CallableMargins(scaled_by(Opaque()))
    assert "\n" not in str(error.value)
    assert CallableMargins(scaled_by(Opaque()), version="1").identity()["version"] == "1"


def test_yaml_length_penalty_takes_a_version():
    from modpo.margin_specs import margin_sources

    tok = tiny.tokenizer()
    plain, versioned = margin_sources([{"type": "length_penalty"}, {"type": "length_penalty", "version": 2}], tok, 32)
    assert plain.version is None and versioned.version == "2"
    assert plain.identity() != versioned.identity()


# ------------------------------------------------------------------------------------------ device placement

def test_margin_models_score_on_the_requested_device_and_return(tmp_path):
    tok = tiny.tokenizer()
    events = []
    reward = tiny.spy_placement(tiny.model(len(tok), seed=20, num_labels=2), events, "reward")
    reference = tiny.spy_placement(tiny.model(len(tok), seed=21), events, "reference")
    policy = tiny.spy_placement(tiny.perturbed(tiny.model(len(tok), seed=21), seed=22), events, "policy")
    sources = [RewardModelMargins(reward, tokenizer=tok, batch_size=2),
               ImplicitRewardMargins(policy, ref_model=reference, tokenizer=tok, batch_size=2),
               CallableMargins(length_penalty)]  # no model: nothing to move
    data = Dataset.from_list(tiny.rows(3, seed=23))
    compute_margin_rewards(sources, data, tmp_path, device="cuda:1")
    for label in ("reward", "policy", "reference"):
        assert tiny.placement_of(events, label) == ["to cuda:1", "forward", "to cpu"], label
    # Cached: nothing is moved or run again; without a device, models stay where they are.
    events.clear()
    compute_margin_rewards(sources, data, tmp_path, device="cuda:1")
    compute_margin_rewards(sources[:2], Dataset.from_list(tiny.rows(3, seed=24)), tmp_path)
    assert {what for _, what, _ in events} == {"forward"}
