"""The checks every command runs before any model loads: strict YAML, numeric settings, model folders, data rows.

Each case runs through the CLI in-process and checks the one error line and that no model was loaded (the
loaders are replaced by ones that fail the test). docs/reliability.md lists the same cases ("Preflight").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import save_file

import tiny
from modpo import stages
from modpo.front import sweep
from modpo.run_config import StageConfig, load_config
from tiny import run_cli as run, write_jsonl, write_yaml

TRAINING = {"use_cpu": True, "report_to": [], "save_strategy": "no", "max_steps": 1,
            "per_device_train_batch_size": 2, "disable_tqdm": True, "logging_steps": 1}
GOOD = [{"prompt": "p0 p1", "chosen": "a b", "rejected": "c d"},
        {"prompt": "p2", "chosen": "e f g", "rejected": "h"}]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    tok = tiny.tokenizer()
    return tiny.save(tiny.model(len(tok), seed=0), tok, tmp_path_factory.mktemp("base") / "lm")


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any model or tokenizer loads: the preflight must refuse before."""
    def loaded(*args, **kwargs):
        raise AssertionError(f"a model or tokenizer was loaded: {args}")

    for module in (stages, sweep):
        monkeypatch.setattr(module, "load_model", loaded)
        monkeypatch.setattr(module, "load_tokenizer", loaded)


def refused(capsys, tmp_path, base, *fragments, command="train", data=None, config_keys=None, overrides=()):
    out = tmp_path / "out"
    config = {"model": base, "output_dir": str(out), "train_data": data or write_jsonl(tmp_path / "pairs.jsonl", GOOD),
              "training": dict(TRAINING), **(config_keys or {})}
    code, stdout, err = run(capsys, command, "--config", write_yaml(tmp_path / "c.yaml", config), *overrides)
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # progress bars aside
    assert code == 2 and stdout == "" and len(lines) == 1 and lines[0].startswith("modpo: error: "), (code, err)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists()
    return lines[0]


# ---------------------------------------------------------------------------------------------- YAML


def test_a_duplicate_key_is_refused_with_file_and_line(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: a\noutput_dir: out\ntraining:\n  beta: 0.1\n  beta: 0.5\n")
    code, _, err = run(capsys, "train", "--config", str(config))
    assert code == 2
    assert err.strip() == f"modpo: error: {config}, line 5: duplicate key 'beta' (first given on line 4)"


@pytest.mark.parametrize("case", ["folder", "not_utf8"])
def test_a_config_that_is_no_yaml_text(capsys, tmp_path, case):
    config = tmp_path / "c.yaml"
    if case == "folder":
        config.mkdir()
        expected = f"modpo: error: config file {config} is a folder, not a YAML file"
    else:
        config.write_bytes(b"model: caf\xe9\n")
        expected = f"modpo: error: config file {config} is not UTF-8 text (byte 10: invalid continuation byte)"
    code, _, err = run(capsys, "train", "--config", str(config))
    assert code == 2 and err.strip() == expected


def test_home_is_expanded_in_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = write_yaml(tmp_path / "c.yaml", {"model": "~/lm", "output_dir": "~/out", "train_data": {
        "loader": "jsonl", "path": "~/d.jsonl"}, "margins": [{"type": "implicit_reward", "model": "~/m"}],
        "training": {"beta": 0.1}})
    cfg = load_config(StageConfig, config, ["eval_data=~/e.jsonl"])
    assert (cfg.model, cfg.output_dir, cfg.eval_data) == (f"{tmp_path}/lm", f"{tmp_path}/out", f"{tmp_path}/e.jsonl")
    assert cfg.train_data["path"] == f"{tmp_path}/d.jsonl" and cfg.margins[0]["model"] == f"{tmp_path}/m"


# ------------------------------------------------------------------------------------ numeric settings


@pytest.mark.parametrize("override, message", [
    ("training.learning_rate=-0.1", "training: learning_rate = -0.1 must be >= 0"),
    ("training.learning_rate=abc", "training: learning_rate = 'abc' is not a number"),
    ("training.per_device_train_batch_size=0", "training: per_device_train_batch_size = 0 must be at least 1"),
    ("training.gradient_accumulation_steps=1.5", "training: gradient_accumulation_steps = 1.5 must be a whole number"),
    ("training.max_length=1.5", "training: max_length = 1.5 must be a whole number"),
    ("training.max_steps=0", "training: max_steps = 0: the run would train no steps"),
])
def test_training_numbers(capsys, tmp_path, base, no_loading, override, message):
    refused(capsys, tmp_path, base, message, overrides=[override])


def test_zero_epochs_train_no_steps(capsys, tmp_path, base, no_loading):
    refused(capsys, tmp_path, base, "training: num_train_epochs = 0: the run would train no steps", command="sft",
            data=write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p0", "completion": "a"}]),
            overrides=["training.max_steps=-1", "training.num_train_epochs=0"])


@pytest.mark.parametrize("beta", [0, -1, float("nan"), float("inf")])
def test_a_margin_beta_must_be_finite_and_positive(capsys, tmp_path, base, no_loading, beta):
    refused(capsys, tmp_path, base, "margins[0]: beta = ", "must be a finite number > 0",
            config_keys={"margins": [{"type": "implicit_reward", "model": base, "beta": beta}]},
            overrides=["training.weights=[0.5,0.5]"])


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", 0, "evaluation: batch_size = 0 must be at least 1"),
    ("max_new_tokens", 0, "evaluation: max_new_tokens = 0 must be at least 1"),
    ("temperature", -0.5, "evaluation: temperature = -0.5 must be >= 0 (0 samples greedily)"),
    ("top_p", 0, "evaluation: top_p = 0 must be in (0, 1]"),
    ("top_p", 1.5, "evaluation: top_p = 1.5 must be in (0, 1]"),
    ("samples_per_prompt", 0, "evaluation: samples_per_prompt = 0 must be at least 1"),
])
def test_front_sampling_settings_are_checked_before_the_first_point_trains(capsys, tmp_path, base, no_loading,
                                                                            key, value, message):
    out = tmp_path / "front"
    config = write_yaml(tmp_path / "f.yaml", {
        "output_dir": str(out), "weights": [[0.5, 0.5]],
        "train": {"model": base, "train_data": write_jsonl(tmp_path / "pairs.jsonl", GOOD), "training": TRAINING,
                  "margins": [{"type": "length_penalty"}]},
        "evaluation": {"prompts": ["p0"], "evaluators": [{"type": "length_penalty"}], key: value}})
    code, _, err = run(capsys, "front", "--config", config)
    assert code == 2 and err.strip() == f"modpo: error: {message}" and not out.exists()


# ---------------------------------------------------------------------------------------- model folders


def copy_model(base: str, to: Path) -> Path:
    to.mkdir()
    for file in Path(base).iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


def test_a_torn_safetensors_file_is_refused_before_loading(capsys, tmp_path, base, no_loading):
    folder = copy_model(base, tmp_path / "torn")
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:40])
    refused(capsys, tmp_path, str(folder), f"cannot load a model from {folder}: model.safetensors is not a readable "
            "safetensors file")


def test_a_folder_without_safetensors_weights(capsys, tmp_path, base, no_loading):
    folder = copy_model(base, tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    refused(capsys, tmp_path, str(folder), f"cannot load a model from {folder}: Error no file named model.safetensors")


def test_a_sharded_model_missing_a_shard(capsys, tmp_path, base, no_loading):
    folder = copy_model(base, tmp_path / "sharded")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002.safetensors"}}))
    refused(capsys, tmp_path, str(folder), "model-00002.safetensors is missing (listed in the weight index)")


def test_a_classifier_given_where_log_probs_are_needed(capsys, tmp_path, no_loading):
    tok = tiny.tokenizer()
    classifier = tiny.save(tiny.model(len(tok), seed=1, num_labels=1), tok, tmp_path / "rm")
    refused(capsys, tmp_path, classifier, f"{classifier} is a LlamaForSequenceClassification, not a causal LM",
            command="dpo")


def test_a_reward_margin_needs_a_score_head(capsys, tmp_path, base, no_loading):
    refused(capsys, tmp_path, base, f"margins[0]: {base} holds no trained classification head (missing score.weight)",
            config_keys={"margins": [{"type": "reward_model", "model": base}]},
            overrides=["training.weights=[0.5,0.5]"])


def test_a_tokenizer_larger_than_the_models_vocabulary(capsys, tmp_path, no_loading):
    tok = tiny.tokenizer()
    small = tiny.save(tiny.model(len(tok) - 3, seed=2), tok, tmp_path / "small")
    refused(capsys, tmp_path, small, f"the tokenizer has {len(tok)} tokens but {small} has vocab_size {len(tok) - 3}")


def test_a_reference_model_of_another_vocabulary(capsys, tmp_path, base, no_loading):
    tok = tiny.tokenizer()
    wide = tiny.save(tiny.model(len(tok) + 8, seed=3), tok, tmp_path / "wide")
    refused(capsys, tmp_path, base, f"ref_model: {wide} has vocab_size {len(tok) + 8} but the model {base} has "
            f"{len(tok)}", command="dpo", config_keys={"ref_model": wide})


def test_a_missing_data_file_is_found_before_the_model_loads(capsys, tmp_path, base, no_loading):
    missing = tmp_path / "absent.jsonl"
    refused(capsys, tmp_path, base, f"{missing}: no such file", data=str(missing))


def test_an_unwritable_output_location(capsys, tmp_path, base, no_loading):
    blocked = tmp_path / "a_file"
    blocked.write_text("x")
    out = blocked / "out"
    config = write_yaml(tmp_path / "c.yaml", {"model": base, "output_dir": str(out), "training": TRAINING,
                                              "train_data": write_jsonl(tmp_path / "pairs.jsonl", GOOD)})
    code, _, err = run(capsys, "train", "--config", config)
    assert code == 2 and err.strip() == f"modpo: error: output_dir {out}: {blocked} is a file, not a folder"


# ----------------------------------------------------------------------------------------------- data rows


def test_rows_mixing_text_and_chat_are_refused_naming_the_first_odd_row(capsys, tmp_path, base, no_loading):
    chat = {"prompt": [{"role": "user", "content": "p0"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD + ["", chat])
    refused(capsys, tmp_path, base, f"{data}, row 4, field 'prompt': is a message list, but row 1's is text: every "
            "row of a file must have the same format", data=data)


def test_the_preflight_passes_a_good_run(capsys, tmp_path, base):
    out = tmp_path / "out"
    config = write_yaml(tmp_path / "c.yaml", {"model": base, "output_dir": str(out), "training": TRAINING,
                                              "train_data": write_jsonl(tmp_path / "pairs.jsonl", GOOD)})
    code, stdout, _ = run(capsys, "dpo", "--config", config)
    assert code == 0 and f"saved to {out}" in stdout and os.path.exists(out / "model.safetensors")
