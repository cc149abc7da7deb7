"""The training stages through the CLI: `modpo sft | reward | dpo | train`, on a tiny local model, on CPU.

Each stage must leave a loadable save_pretrained folder holding trained weights, a model card (README.md)
and modpo_run.json; rerunning the same config must not train again; a different config into the same
output_dir must be refused (one line, exit 2) unless --overwrite. Margins are checked by value: the
trainer's logged `margins/objective_k` must equal the mean margin difference computed here from the data.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest
import torch

import tiny
from tiny import run_cli as run, write_jsonl, write_yaml
from modpo.cli import main
from modpo.run_config import StageConfig

SEED = 7
# 8 rows, batch 4, 2 steps: exactly one epoch, and logging_steps (10 by default) > max_steps, so the final
# log averages the per-batch metrics over the whole data set.
TRAINING = {"use_cpu": True, "report_to": [], "save_strategy": "no", "max_steps": 2,
            "per_device_train_batch_size": 4, "disable_tqdm": True, "seed": SEED}
ROWS = 8


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    tok = tiny.tokenizer()
    return tiny.save(tiny.model(len(tok), seed=0), tok, tmp_path_factory.mktemp("base") / "lm")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("data")
    pairs = tiny.rows(ROWS, seed=1)
    with_margins = tiny.rows(ROWS, seed=2, num_margins=1)
    scored = [{**r, "score_c": float(i % 3), "score_r": 0.5 * i} for i, r in enumerate(tiny.rows(ROWS, seed=3))]
    sft = [{"prompt": r["prompt"], "completion": " " + r["chosen"]} for r in tiny.rows(ROWS, seed=4)]
    return {name: write_jsonl(folder / f"{name}.jsonl", rows)
            for name, rows in (("pairs", pairs), ("margins", with_margins), ("scored", scored), ("sft", sft))}



def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_config(folder: Path, name: str, config: dict) -> str:
    return write_yaml(folder / f"{name}.yaml", config)


def stage_config(folder: Path, base: str, train_data, **keys) -> tuple[str, Path, dict]:
    out = folder / "out"
    config = {"model": base, "output_dir": str(out), "train_data": train_data,
              "training": {**TRAINING, **keys.pop("training", {})}, **keys}
    return write_config(folder, "stage", config), out, config



def train_ok(capsys, command: str, config: str, *extra: str) -> Path:
    code, out, err = run(capsys, command, "--config", config, *extra)
    assert code == 0, err[-2000:]
    saved = Path(out.strip().splitlines()[-1].removeprefix("saved to "))
    return saved


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def check_record(out: Path, stage: str, config: dict) -> dict:
    """modpo_run.json: the stage, the full config (defaults filled in), seed and data."""
    record = json.loads((out / "modpo_run.json").read_text())
    assert record["stage"] == stage
    assert record["config"] == dataclasses.asdict(StageConfig(**config))
    assert record["seed"] == SEED
    assert record["train_data"] == config["train_data"]
    assert record["margins"] == config.get("margins", [])
    return record


def card_value(card: str, key: str):
    """The JSON value of the card's `- key: {...}` line."""
    (line,) = [line for line in card.splitlines() if line.startswith(f"- {key}: ")]
    return json.loads(line.removeprefix(f"- {key}: "))


def check_card(out: Path, stage: str, config: dict, *lines: str) -> str:
    card = (out / "README.md").read_text()
    assert f"stage `{stage}`" in card
    assert f"- base model: `{config['model']}`" in card
    data = config["train_data"]
    (data_line,) = [line for line in card.splitlines() if line.startswith("- data: ")]
    assert (data if isinstance(data, str) else data["path"]) in data_line
    assert f"- seed: {SEED}" in card
    for line in lines:
        assert line in card.splitlines(), f"{line!r} not in the card:\n{card}"
    return card


def changed_parameters(saved: torch.nn.Module, base: torch.nn.Module) -> list[str]:
    """Names of parameters both models have whose values differ."""
    ours, theirs = saved.state_dict(), base.state_dict()
    return [n for n in ours if n in theirs and ours[n].shape == theirs[n].shape and not torch.equal(ours[n], theirs[n])]


def assert_rerun_is_noop(capsys, monkeypatch, command: str, config: str, out: Path, trainer_cls) -> None:
    """The same config again: exit 0, nothing trained, nothing rewritten."""
    before = mtimes(out)

    def no_training(*args, **kwargs):
        raise AssertionError("a rerun of a finished config must not train")

    monkeypatch.setattr(trainer_cls, "train", no_training)
    code, stdout, err = run(capsys, command, "--config", config)
    assert code == 0, err[-2000:]
    assert stdout.strip().endswith(f"saved to {out}")
    assert mtimes(out) == before


def margin_differences(rows: list[dict], margin) -> list[float]:
    return [margin(r, "chosen") - margin(r, "rejected") for r in rows]


def assert_logged_margin(record: dict, k: int, differences: list[float]) -> None:
    logged = record["final_log"][f"margins/objective_{k}"]
    assert logged == pytest.approx(statistics.fmean(differences), abs=1e-4)


# ----------------------------------------------------------------------------------------------- stages


def test_sft(capsys, monkeypatch, tmp_path, base, data):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    config, out, raw = stage_config(tmp_path, base, data["sft"])
    assert train_ok(capsys, "sft", config) == out
    record = check_record(out, "sft", raw)
    assert record["final_log"]["train_loss"] > 0
    check_card(out, "sft", raw)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert changed_parameters(model, AutoModelForCausalLM.from_pretrained(base)), "no weight was trained"
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(base).get_vocab()
    assert_rerun_is_noop(capsys, monkeypatch, "sft", config, out, SFTTrainer)


def test_different_config_into_the_same_output_dir(capsys, tmp_path, base, data):
    config, out, raw = stage_config(tmp_path, base, data["sft"])
    train_ok(capsys, "sft", config)
    before = (out / "modpo_run.json").read_text()
    for argv in (["sft", "--config", config, "training.learning_rate=0.001"],
                 ["dpo", "--config", config, f"train_data={data['pairs']}"]):
        code, _, err = run(capsys, *argv)
        assert code == 2
        assert err.strip().splitlines() == [f"modpo: error: {out} already holds a different sft run; "
                                            "choose another output_dir or pass --overwrite"]
        assert (out / "modpo_run.json").read_text() == before
    train_ok(capsys, "sft", config, "training.learning_rate=0.001", "--overwrite")
    record = json.loads((out / "modpo_run.json").read_text())
    assert record["config"]["training"]["learning_rate"] == 0.001
    assert record["config_hash"] != json.loads(before)["config_hash"]


def test_changed_inputs_are_not_reused(capsys, monkeypatch, tmp_path, base, data):
    """A rerun reuses the finished run only while its data and models hold what they held: the same bytes
    (a file touched or rewritten unchanged is reused), not just the same paths."""
    import shutil

    from modpo.trainer import MODPOTrainer

    pairs = Path(shutil.copy(data["pairs"], tmp_path / "pairs.jsonl"))
    config, out, raw = stage_config(tmp_path, base, str(pairs), training={"weights": [1.0]})
    train_ok(capsys, "dpo", config)
    record = json.loads((out / "modpo_run.json").read_text())
    assert set(record["inputs"]) == {base, str(pairs)}
    assert record["inputs"][str(pairs)].startswith("sha256 ")
    pairs.write_bytes(pairs.read_bytes())  # same content, new modification time
    assert_rerun_is_noop(capsys, monkeypatch, "dpo", config, out, MODPOTrainer)
    monkeypatch.undo()

    rows = read_jsonl(str(pairs))
    write_jsonl(pairs, [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows])
    before = (out / "model.safetensors").read_bytes()
    code, _, err = run(capsys, "dpo", "--config", config)
    assert code == 2
    assert err.strip().splitlines() == [f"modpo: error: {out} holds this dpo run trained on inputs that have changed "
                                        f"since ({pairs}); pass --overwrite to train again"]
    assert (out / "model.safetensors").read_bytes() == before
    train_ok(capsys, "dpo", config, "--overwrite")
    assert (out / "model.safetensors").read_bytes() != before  # trained again, on the swapped pairs
    assert json.loads((out / "modpo_run.json").read_text())["config_hash"] != record["config_hash"]

    # a record written before input contents were recorded is judged by its config alone
    legacy = json.loads((out / "modpo_run.json").read_text())
    del legacy["inputs"]
    (out / "modpo_run.json").write_text(json.dumps(legacy))
    write_jsonl(pairs, rows)
    assert_rerun_is_noop(capsys, monkeypatch, "dpo", config, out, MODPOTrainer)
    monkeypatch.undo()

    (out / "modpo_run.json").write_text('{"stage": "dpo", "conf')  # a torn record
    code, _, err = run(capsys, "dpo", "--config", config)
    assert code == 2 and err.strip().splitlines() == [
        f"modpo: error: {out / 'modpo_run.json'}: unreadable run record; pass --overwrite to train into {out} again"]


def test_reward(capsys, monkeypatch, tmp_path, base, data):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import RewardTrainer

    config, out, raw = stage_config(tmp_path, base, data["pairs"])
    train_ok(capsys, "reward", config)
    check_record(out, "reward", raw)
    check_card(out, "reward", raw)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    tok = tiny.tokenizer()
    scores = model(**tok(["p0 a b", "p1 c"], return_tensors="pt", padding=True)).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()
    assert changed_parameters(model.model, AutoModelForCausalLM.from_pretrained(base).model), "backbone not trained"
    assert_rerun_is_noop(capsys, monkeypatch, "reward", config, out, RewardTrainer)


def test_reward_with_two_labels_is_refused_in_one_line(capsys, tmp_path, base, data):
    """TRL's RewardTrainer trains one output: num_labels=2 is refused up front, nothing is left behind."""
    config, out, raw = stage_config(tmp_path, base, data["pairs"], num_labels=2)
    code, _, err = run(capsys, "reward", "--config", config)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("modpo: error: num_labels = 2")
    assert not Path(out).exists()


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, base, data):
    """`modpo dpo` once (its output is the implicit-reward margin model below)."""
    folder = tmp_path_factory.mktemp("dpo")
    config, out, raw = stage_config(folder, base, data["pairs"], training={"beta": 0.2, "learning_rate": 1e-3})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODPO_CACHE", str(folder / "cache"))
        assert main(["dpo", "--config", config]) == 0
    return config, out, raw


def test_dpo(capsys, monkeypatch, base, dpo_run):
    from transformers import AutoModelForCausalLM

    from modpo.trainer import MODPOTrainer

    config, out, raw = dpo_run
    record = check_record(out, "dpo", raw)
    assert (record["weights"], record["beta"], record["loss_type"]) == ([1.0], 0.2, "sigmoid")
    assert record["margin_sources"] == []
    assert "margins/objective_1" not in record["final_log"]
    check_card(out, "dpo", raw, "- weights: [1.0]", "- beta: 0.2", "- loss_type: sigmoid")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert changed_parameters(model, AutoModelForCausalLM.from_pretrained(base)), "no weight was trained"
    assert_rerun_is_noop(capsys, monkeypatch, "dpo", config, out, MODPOTrainer)


def test_train_k2_margin_columns(capsys, monkeypatch, tmp_path, base, data):
    from transformers import AutoModelForCausalLM

    from modpo.trainer import MODPOTrainer

    config, out, raw = stage_config(tmp_path, base, data["margins"], training={"weights": [0.6, 0.4], "beta": 0.3})
    train_ok(capsys, "train", config)
    record = check_record(out, "train", raw)
    assert (record["weights"], record["beta"]) == ([0.6, 0.4], 0.3)
    rows = read_jsonl(data["margins"])
    assert_logged_margin(record, 1, margin_differences(rows, lambda r, side: r[f"{side}_margins"][0]))
    check_card(out, "train", raw, "- weights: [0.6, 0.4]", "- beta: 0.3")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert changed_parameters(model, AutoModelForCausalLM.from_pretrained(base)), "no weight was trained"
    assert_rerun_is_noop(capsys, monkeypatch, "train", config, out, MODPOTrainer)


def test_train_k2_card_names_the_margin_columns(capsys, tmp_path, base, data):
    config, out, raw = stage_config(tmp_path, base, data["margins"], training={"weights": [0.6, 0.4]})
    train_ok(capsys, "train", config)
    assert "chosen_margins" in (out / "README.md").read_text()
    assert json.loads((out / "modpo_run.json").read_text())["margin_sources"] != []


def test_train_k3_length_penalty_and_columns(capsys, monkeypatch, tmp_path, base, data):
    from modpo.trainer import MODPOTrainer

    spec = {"loader": "jsonl", "path": data["scored"], "columns": {"score_c": "score_c", "score_r": "score_r"}}
    margins = [{"type": "length_penalty"}, {"type": "columns", "chosen": ["score_c"], "rejected": ["score_r"]}]
    config, out, raw = stage_config(tmp_path, base, spec, margins=margins, training={"weights": [0.5, 0.3, 0.2]})
    train_ok(capsys, "train", config)
    record = check_record(out, "train", raw)
    assert record["weights"] == [0.5, 0.3, 0.2]
    assert record["margin_sources"] == ["length_penalty", "columns"]
    rows = read_jsonl(data["scored"])
    assert_logged_margin(record, 1, margin_differences(rows, lambda r, side: -len(r[side].split())))
    assert_logged_margin(record, 2, margin_differences(rows, lambda r, side: r[f"score_{side[0]}"]))
    card = check_card(out, "train", raw, "- weights: [0.5, 0.3, 0.2]", "- beta: 0.1")
    assert card_value(card, "margin sources") == margins
    assert_rerun_is_noop(capsys, monkeypatch, "train", config, out, MODPOTrainer)


def sequence_logp(model, tok, prompt: str, response: str) -> float:
    """log pi(response + eos | prompt), by hand: one unpadded forward pass."""
    prompt_ids = tok(prompt)["input_ids"]
    ids = prompt_ids + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logps[len(prompt_ids) - 1:].sum().item()


def test_train_k2_implicit_reward_with_lora(capsys, monkeypatch, tmp_path, base, data, dpo_run):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from modpo.trainer import MODPOTrainer

    dpo_out = dpo_run[1]
    beta_margin = 0.5
    margins = [{"type": "implicit_reward", "model": str(dpo_out), "ref_model": base, "beta": beta_margin}]
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    config, out, raw = stage_config(tmp_path, base, data["pairs"], margins=margins, lora=lora,
                                    training={"weights": [0.5, 0.5], "learning_rate": 1e-3})
    train_ok(capsys, "train", config)
    record = check_record(out, "train", raw)
    assert record["margin_sources"] == [f"implicit_reward ({dpo_out}; reference {base}; beta 0.5)"]
    card = check_card(out, "train", raw, "- weights: [0.5, 0.5]")
    assert card_value(card, "margin sources") == margins
    assert card_value(card, "LoRA") == lora

    # the margin is beta' * log(pi_dpo / pi_base), computed here by hand
    tok, policy, reference = tiny.tokenizer(), AutoModelForCausalLM.from_pretrained(dpo_out), \
        AutoModelForCausalLM.from_pretrained(base)

    def implicit(row, side):
        return beta_margin * (sequence_logp(policy, tok, row["prompt"], row[side])
                              - sequence_logp(reference, tok, row["prompt"], row[side]))

    differences = margin_differences(read_jsonl(data["pairs"]), implicit)
    assert max(abs(d) for d in differences) > 1e-4, "the DPO model should differ from its reference"
    assert_logged_margin(record, 1, differences)

    # a LoRA adapter over the base: r=4 on q_proj/v_proj, trained, base weights untouched
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    assert not (out / "model.safetensors").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(("q_proj" in n) or ("v_proj" in n) for n in lora_b)
    assert any(p.abs().sum() > 0 for p in lora_b.values()), "LoRA B starts at zero; training must move it"
    merged_base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                   for n, p in model.state_dict().items() if "lora_" not in n}
    for name, value in AutoModelForCausalLM.from_pretrained(base).state_dict().items():
        assert torch.equal(merged_base[name], value), name
    assert_rerun_is_noop(capsys, monkeypatch, "train", config, out, MODPOTrainer)


def test_train_columns_margins_from_a_plain_path(capsys, tmp_path, base, data):
    margins = [{"type": "columns", "chosen": ["score_c"], "rejected": ["score_r"]}]
    config, out, raw = stage_config(tmp_path, base, data["scored"], margins=margins, training={"weights": [0.5, 0.5]})
    train_ok(capsys, "train", config)
    record = check_record(out, "train", raw)
    rows = read_jsonl(data["scored"])
    assert_logged_margin(record, 1, margin_differences(rows, lambda r, side: r[f"score_{side[0]}"]))


@pytest.mark.parametrize("sampling", [{"weight_sampling": "cycle", "weight_list": [[0.2, 0.8], [0.7, 0.3]]},
                                      {"weight_sampling": "dirichlet", "weight_concentration": 0.5}],
                         ids=["cycle", "dirichlet"])
def test_a_conditioned_run_records_how_its_weights_were_drawn(capsys, tmp_path, base, data, sampling):
    """Under weight_sampling, `weights` only fixes K: the record and card state K and how w was drawn, and
    no weight vector as the model's."""
    config, out, raw = stage_config(tmp_path, base, data["margins"], training={"weights": [0.5, 0.5], **sampling})
    train_ok(capsys, "train", config)
    record = check_record(out, "train", raw)
    assert "weights" not in record and record["objectives"] == 2
    assert record["conditioning"]["sampling"] == sampling["weight_sampling"]
    card = check_card(out, "train", raw, "- objectives: 2")
    assert not [line for line in card.splitlines() if line.startswith("- weights:")]
    (line,) = [line for line in card.splitlines() if "weight-conditioned on 2 objectives" in line]
    drawn = (str(sampling["weight_list"]) if sampling["weight_sampling"] == "cycle"
             else f"concentration {[sampling['weight_concentration']] * 2}")
    assert drawn in line, line
