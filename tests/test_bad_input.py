"""A catalogue of bad input, each case through the CLI (`modpo.cli.main`), as a user would meet it.

Every case checks what the user sees: a non-zero exit code, ONE line `modpo: error: ...` on stderr that
names the file, row and field where that applies (progress bars that datasets/transformers draw on stderr
before the failure are ignored), and no output_dir left behind. docs/reliability.md lists the same cases.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest

import tiny
from tiny import run_cli as run, write_jsonl, write_yaml as write_config

TRAINING = {"use_cpu": True, "report_to": [], "save_strategy": "no", "max_steps": 1,
            "per_device_train_batch_size": 2, "disable_tqdm": True, "logging_steps": 1}
GOOD = [{"prompt": "p0 p1", "chosen": "a b", "rejected": "c d"},
        {"prompt": "p2", "chosen": "e f g", "rejected": "h"}]
PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's "name:  50%|#####     | 1/2 [...]"


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A tiny causal LM + word tokenizer saved with save_pretrained."""
    tok = tiny.tokenizer()
    return tiny.save(tiny.model(len(tok), seed=0), tok, tmp_path_factory.mktemp("base") / "lm")


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> str:
    """A tiny sequence classifier with ONE output, saved with save_pretrained."""
    tok = tiny.tokenizer()
    return tiny.save(tiny.model(len(tok), seed=1, num_labels=1), tok, tmp_path_factory.mktemp("rm") / "rm")





def error_line(err: str) -> str:
    """The one error line of a failed command: no traceback, nothing else but progress bars."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("modpo: error: "), lines[0]
    return lines[0]


def assert_fails(capsys, argv: list[str], output_dir: Path | None, *fragments: str, code: int = 2) -> str:
    """Run the command; it must fail with `code`, one stderr line holding every fragment, no output_dir."""
    returned, stdout, err = run(capsys, *argv)
    line = error_line(err)
    assert returned == code, (returned, line)
    assert stdout == "", stdout
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    if output_dir is not None:
        assert not output_dir.exists(), f"{output_dir} was left behind"
    return line


def train_config(tmp_path: Path, base: str, data, **keys) -> tuple[str, Path]:
    """A `modpo train` YAML config; returns (config path, output_dir)."""
    out = tmp_path / "out"
    training = {**TRAINING, **keys.pop("training", {})}
    config = {"model": base, "output_dir": str(out), "train_data": data, "training": training, **keys}
    return write_config(tmp_path / "train.yaml", config), out


def with_margins(rows: list[dict], values=((0.5, 0.1), (0.2, 0.3))) -> list[dict]:
    return [{**r, "chosen_margins": [c], "rejected_margins": [j]} for r, (c, j) in zip(rows, values)]


# ------------------------------------------------------------------------------------------ data cases

# (id, line 3 of the file (a dict, or a raw str), weights, fragments of the message besides the file name)
DATA_CASES = [
    ("malformed_jsonl_line", '{"prompt": "p0", "chosen": "a"', [1.0], ["row 3", "malformed JSON"]),
    ("missing_column", {"prompt": "p0", "chosen": "a"}, [1.0], ["row 3", "field 'rejected'", "missing column"]),
    ("empty_prompt", {"prompt": "  ", "chosen": "a", "rejected": "b"}, [1.0], ["row 3", "field 'prompt'", "is empty"]),
    ("empty_response", {"prompt": "p0", "chosen": "", "rejected": "b"}, [1.0],
     ["row 3", "field 'chosen'", "is empty"]),
    ("non_text_response", {"prompt": "p0", "chosen": 42, "rejected": "b"}, [1.0],
     ["row 3", "field 'chosen'", "must be text, got int"]),
    ("chosen_identical_to_rejected", {"prompt": "p0", "chosen": "a b", "rejected": "a b"}, [1.0],
     ["row 3", "field 'chosen'", "identical to 'rejected'"]),
    ("chat_message_without_content",
     {"prompt": [{"role": "user", "content": "p0"}], "chosen": [{"role": "assistant"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, [1.0],
     ["row 3", "field 'chosen[0].content'", "expected a string"]),
    ("chat_message_unknown_role",
     {"prompt": [{"role": "robot", "content": "p0"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, [1.0],
     ["row 3", "field 'prompt[0].role'", "'robot'"]),
    ("chat_answer_not_a_message_list",
     {"prompt": [{"role": "user", "content": "p0"}], "chosen": "a", "rejected": "b"}, [1.0],
     ["row 3", "field 'chosen'", "must be too"]),
]

# Margin columns: rows 1-2 carry one margin each (weights [0.5, 0.5]); line 3 (a pair with these margin
# fields) is bad.
MARGIN_CASES = [
    ("nan_margin", {"chosen_margins": [math.nan], "rejected_margins": [0.0]},
     ["row 3", "field 'chosen_margins[0]'", "finite number, got nan"]),
    ("infinite_margin", {"chosen_margins": [0.0], "rejected_margins": [-math.inf]},
     ["row 3", "field 'rejected_margins[0]'", "finite number, got -inf"]),
    ("non_numeric_margin", {"chosen_margins": ["high"], "rejected_margins": [0.0]},
     ["row 3", "field 'chosen_margins[0]'", "expected a number, got str"]),
    ("margin_not_a_list", {"chosen_margins": 0.5, "rejected_margins": [0.0]},
     ["row 3", "field 'chosen_margins'", "expected a list of numbers"]),
    ("margin_lists_of_different_length", {"chosen_margins": [0.5, 0.1], "rejected_margins": [0.0]},
     ["row 3", "field 'rejected_margins'", "as many values as chosen_margins"]),
    ("margin_column_missing_on_one_side", {"chosen_margins": [0.5]},
     ["row 3", "field 'rejected_margins'", "missing column"]),
]


@pytest.mark.parametrize("line3, weights, fragments", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_row(capsys, tmp_path, base, line3, weights, fragments):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD + [line3])
    config, out = train_config(tmp_path, base, data, training={"weights": weights})
    assert_fails(capsys, ["train", "--config", config], out, data, *fragments)


@pytest.mark.parametrize("line3, fragments", [c[1:] for c in MARGIN_CASES], ids=[c[0] for c in MARGIN_CASES])
def test_bad_margin_row(capsys, tmp_path, base, line3, fragments):
    line3 = {"prompt": "p0", "chosen": "a", "rejected": "b", **line3}
    data = write_jsonl(tmp_path / "pairs.jsonl", with_margins(GOOD) + [line3])
    config, out = train_config(tmp_path, base, data, training={"weights": [0.5, 0.5]})
    assert_fails(capsys, ["train", "--config", config], out, data, *fragments)


def test_row_numbers_count_blank_lines(capsys, tmp_path, base):
    """Loaders count JSONL lines (blank ones too); checks made after loading must name the same line."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(GOOD[0]) + "\n\n" + json.dumps({"prompt": "p0", "chosen": "a", "rejected": "a"}) + "\n")
    config, out = train_config(tmp_path, base, str(data))
    assert_fails(capsys, ["train", "--config", config], out, str(data), "row 3", "identical to 'rejected'")


def test_margin_list_shorter_than_the_weights(capsys, tmp_path, base):
    """Rows 1-2 carry 2 margins (weights K=3); row 3 only 1 on both sides."""
    rows = [{**r, "chosen_margins": [0.1, 0.2], "rejected_margins": [0.3, 0.4]} for r in GOOD]
    rows.append({"prompt": "p0", "chosen": "a", "rejected": "b", "chosen_margins": [0.1], "rejected_margins": [0.2]})
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config, out = train_config(tmp_path, base, data, training={"weights": [0.5, 0.3, 0.2]})
    assert_fails(capsys, ["train", "--config", config], out, data, "row 3", "field 'chosen_margins'",
                 "has 1 values, expected 2")


def test_misnamed_column_via_mapping(capsys, tmp_path, base):
    """columns maps prompt -> question; row 3 still says "prompt"."""
    rows = [{"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in GOOD]
    rows.append(GOOD[0])
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    spec = {"loader": "jsonl", "path": path, "columns": {"prompt": "question"}}
    config, out = train_config(tmp_path, base, spec)
    assert_fails(capsys, ["train", "--config", config], out, path, "row 3", "field 'question'", "missing column")


def test_missing_data_file(capsys, tmp_path, base):
    path = tmp_path / "absent.jsonl"
    config, out = train_config(tmp_path, base, str(path))
    assert_fails(capsys, ["train", "--config", config], out, str(path), "no such file")


def test_unsupported_data_file_type(capsys, tmp_path, base):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\np0,a,b\n")
    config, out = train_config(tmp_path, base, str(path))
    assert_fails(capsys, ["train", "--config", config], out, str(path), "unsupported file type")


def test_empty_preference_file(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", [])
    config, out = train_config(tmp_path, base, data)
    assert_fails(capsys, ["train", "--config", config], out, data, "no preference pairs in file")


def sft_config(tmp_path: Path, base: str, data: str) -> tuple[str, Path]:
    out = tmp_path / "sft"
    return write_config(tmp_path / "sft.yaml", {"model": base, "output_dir": str(out), "train_data": data,
                                                 "training": TRAINING}), out


def test_sft_row_without_completion(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p0", "completion": "a b"}] * 2 + [{"prompt": "p1"}])
    config, out = sft_config(tmp_path, base, data)
    assert_fails(capsys, ["sft", "--config", config], out, data, "row 3", "completion")


def test_empty_sft_file(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "sft.jsonl", [])
    config, out = sft_config(tmp_path, base, data)
    assert_fails(capsys, ["sft", "--config", config], out, data)


def test_prompt_longer_than_max_length(capsys, tmp_path, base):
    rows = GOOD + [{"prompt": "p0 p1 p2 p3 p0 p1", "chosen": "a", "rejected": "b"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config, out = train_config(tmp_path, base, data, training={"max_length": 5, "long_prompts": "refuse"})
    assert_fails(capsys, ["train", "--config", config], out, data, "row 3", "field 'prompt'",
                 "6 tokens", "max_length=5")


def test_long_prompt_is_cut_with_one_warning_by_default(capsys, caplog, tmp_path, base):
    """One long prompt never stops a run: it keeps its end, and one warning line names its row."""
    rows = GOOD + [{"prompt": "p0 p1 p2 p3 p0 p1", "chosen": "a", "rejected": "b"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config, out = train_config(tmp_path, base, data, training={"max_length": 5})
    with caplog.at_level(logging.WARNING, logger="modpo.data.encode"):
        code, _, _ = run(capsys, "train", "--config", config)
    assert code == 0 and (out / "modpo_run.json").exists()
    lines = [r.getMessage() for r in caplog.records if "too long" in r.getMessage()]
    assert lines == [f"{data}: 1 of 3 prompts were too long for max_length=5 and were cut from the left, keeping "
                     "their end (rows 3)"]


def test_long_responses_are_truncated_and_counted(capsys, caplog, tmp_path, base):
    """Not an error: responses that do not fit max_length are cut, and a warning counts them."""
    max_length = 5
    rows = [{"prompt": "p0", "chosen": "a", "rejected": "b c d e f"},      # rejected: 5 words + eos > 4
            {"prompt": "p1", "chosen": "a b c", "rejected": "d"},          # 3 + eos = 4 fits exactly
            {"prompt": "p2 p3", "chosen": "a b c", "rejected": "d e f g"}]  # room 3: both cut
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config, out = train_config(tmp_path, base, data, training={"max_length": max_length, "max_steps": 1,
                                                               "per_device_train_batch_size": 3})
    expected = sum(len(r[side].split()) + 1 > max_length - len(r["prompt"].split())
                   for r in rows for side in ("chosen", "rejected"))
    assert expected == 3
    caplog.set_level(logging.WARNING, logger="modpo")
    code, stdout, err = run(capsys, "train", "--config", config)
    assert code == 0 and "modpo: error" not in err
    assert (out / "modpo_run.json").exists()
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert warnings == [f"{data}: {expected} of {2 * len(rows)} responses were longer than "
                        f"max_length={max_length} and were truncated"]


# ---------------------------------------------------------------------------------------- weights, beta

WEIGHT_CASES = [
    ("weights_nan", "[.nan, 1.0]", ["training:", "weights[0] = nan is not finite"]),
    ("weights_infinite", "[0.5, .inf]", ["training:", "weights[1] = inf is not finite"]),
    ("weights_negative", "[1.5, -0.5]", ["training:", "weights[1] = -0.5 is negative"]),
    ("weights_w0_zero", "[0.0, 1.0]", ["training:", "weights[0] = 0.0 must be > 0"]),
    ("weights_empty", "[]", ["training:", "weights is empty"]),
    ("weights_not_summing_to_1", "[0.5, 0.4]", ["training:", "sum to 0.9", "simplex"]),
    ("weights_a_number", "0.5", ["training:", "weights = 0.5: expected a list", "e.g. [0.3, 0.7]"]),
    ("weights_without_brackets", "0.3,0.7", ["training:", "weights = '0.3,0.7': expected a list"]),
]


@pytest.mark.parametrize("weights, fragments", [c[1:] for c in WEIGHT_CASES], ids=[c[0] for c in WEIGHT_CASES])
def test_bad_weights(capsys, tmp_path, base, weights, fragments):
    data = write_jsonl(tmp_path / "pairs.jsonl", with_margins(GOOD))
    config, out = train_config(tmp_path, base, data)
    assert_fails(capsys, ["train", "--config", config, f"training.weights={weights}"], out, *fragments)


def test_weights_not_numbers(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", with_margins(GOOD))
    config, out = train_config(tmp_path, base, data)
    assert_fails(capsys, ["train", "--config", config, "training.weights=[a, b]"], out, "training:", "weights[0]")


def test_margins_that_overflow_the_loss(capsys, tmp_path, base):
    """Finite margins whose float32 difference overflows: the non-finite loss stops training, exit code 1."""
    rows = with_margins(GOOD, values=((3e38, -3e38), (3e38, -3e38)))
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config, out = train_config(tmp_path, base, data, training={"weights": [0.5, 0.5]})
    assert_fails(capsys, ["train", "--config", config], out, "non-finite MODPO loss", "at step 0",
                 "batch of data rows", code=1)


def test_weights_longer_than_the_margins(capsys, tmp_path, base):
    """K=3 weights, data with 1 margin column per side."""
    data = write_jsonl(tmp_path / "pairs.jsonl", with_margins(GOOD))
    config, out = train_config(tmp_path, base, data, training={"weights": [0.5, 0.25, 0.25]})
    assert_fails(capsys, ["train", "--config", config], out, data, "row 1", "field 'chosen_margins'",
                 "has 1 values, expected 2")


def test_weights_without_any_margins(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data, training={"weights": [0.5, 0.5]})
    assert_fails(capsys, ["train", "--config", config], out, data, "need 1 margin rewards",
                 "no chosen_margins/rejected_margins columns")


def test_weights_and_margin_sources_disagree(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data, training={"weights": [0.4, 0.3, 0.3]},
                               margins=[{"type": "length_penalty"}])
    assert_fails(capsys, ["train", "--config", config], out, "margin sources give 1 objectives",
                 "expect 2")


@pytest.mark.parametrize("beta", ["0", "-0.1", ".nan"])
def test_beta_not_positive(capsys, tmp_path, base, beta):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data)
    assert_fails(capsys, ["train", "--config", config, f"training.beta={beta}"], out,
                 "training: beta = ", "must be a finite number > 0")


@pytest.mark.parametrize("key, value, fragment", [
    ("loss_type", "ipo", "loss_type = 'ipo'"),
    ("label_smoothing", "0.5", "label_smoothing = 0.5 must be in [0, 0.5)"),
    ("max_length", "1", "max_length = 1 must be at least 2"),
])
def test_other_bad_modpo_settings(capsys, tmp_path, base, key, value, fragment):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data)
    assert_fails(capsys, ["train", "--config", config, f"training.{key}={value}"], out, "training: ", fragment)


def test_label_smoothing_with_the_hinge_loss(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data, training={"loss_type": "hinge", "label_smoothing": 0.1})
    assert_fails(capsys, ["train", "--config", config], out, "training: ",
                 "label_smoothing = 0.1 applies to loss_type 'sigmoid' only, not 'hinge'")


def test_learning_rate_in_exponent_notation(capsys, tmp_path, base):
    """`training.learning_rate=1e-3` must either train with 0.001 or fail with one line naming the key."""
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data)
    code, _, err = run(capsys, "train", "--config", config, "training.learning_rate=1e-3")
    if code == 0:
        record = json.loads((out / "modpo_run.json").read_text())
        assert float(record["config"]["training"]["learning_rate"]) == 0.001
    else:
        assert "learning_rate" in error_line(err) and not out.exists()


def test_unknown_training_key(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data)
    assert_fails(capsys, ["train", "--config", config, "training.wieghts=[1.0]"], out,
                 "training: unknown key(s) wieghts for MODPOConfig")


def test_dpo_refuses_margins_and_weights(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data)
    assert_fails(capsys, ["dpo", "--config", config, "training.weights=[0.5,0.5]"], out,
                 "dpo: a DPO run has one objective")
    assert_fails(capsys, ["dpo", "--config", config, "margins=[{type: length_penalty}]"], out,
                 "dpo: a DPO run has one objective")


# ----------------------------------------------------------------------------------- models, margins


def test_unknown_model_path(capsys, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    missing = tmp_path / "no" / "such-model"
    config, out = train_config(tmp_path, str(missing), data)
    assert_fails(capsys, ["train", "--config", config], out, f"model path {missing} does not exist")


def test_unknown_hub_model_offline(capsys, tmp_path):
    """A hub-shaped id that is not cached, with the hub offline (conftest): a one-line error, not a traceback."""
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, "modpo-test-nonexistent-org/no-such-model", data)
    assert_fails(capsys, ["train", "--config", config], out, "cannot load a tokenizer from",
                 "modpo-test-nonexistent-org/no-such-model")


def test_relative_path_that_does_not_exist(capsys, tmp_path):
    """`runs/sft` could be a hub id as well as a folder: the line says that no such folder exists."""
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, "modpo-test-no-such-dir/sft", data)
    assert_fails(capsys, ["train", "--config", config], out, "cannot load a tokenizer from modpo-test-no-such-dir/sft",
                 "no local file or folder of that name")


def test_unknown_dtype(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data, dtype="bf15")
    assert_fails(capsys, ["train", "--config", config], out, "dtype 'bf15': expected one of", "bf16")


@pytest.mark.parametrize("holds", ["model_only", "tokenizer_only", "nothing"])
def test_model_folder_missing_parts(capsys, tmp_path, holds):
    tok = tiny.tokenizer()
    folder = tmp_path / "incomplete"
    folder.mkdir()
    if holds == "model_only":
        tiny.model(len(tok)).save_pretrained(folder)
    elif holds == "tokenizer_only":
        tok.save_pretrained(folder)
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, str(folder), data)
    if holds == "tokenizer_only":
        assert_fails(capsys, ["train", "--config", config], out, f"cannot load a model from {folder}: ")
    else:
        assert_fails(capsys, ["train", "--config", config], out, f"cannot load a tokenizer from {folder}: the folder "
                     "holds no tokenizer files")


def test_lora_target_modules_the_model_lacks(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data, lora={"r": 4, "target_modules": ["qproj"]})
    assert_fails(capsys, ["train", "--config", config], out, "lora: ", "qproj")


def test_reward_model_margin_without_a_trained_head(capsys, tmp_path, base):
    """A causal LM where a reward model is meant: transformers would score with a random head; refused."""
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data, training={"weights": [0.5, 0.5]},
                               margins=[{"type": "reward_model", "model": base, "outputs": [0]}])
    assert_fails(capsys, ["train", "--config", config], out, "margins[0]", f"{base} holds no trained classification "
                 "head (missing score.weight)")


def test_unknown_margin_type(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data, training={"weights": [0.5, 0.5]},
                               margins=[{"type": "vibes"}])
    assert_fails(capsys, ["train", "--config", config], out, "margins[0]: unknown type 'vibes'")


def test_margin_source_missing_key(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data, training={"weights": [0.5, 0.5]},
                               margins=[{"type": "reward_model"}])
    assert_fails(capsys, ["train", "--config", config], out, "margins[0]: missing key 'model'")


def test_reward_model_with_the_wrong_number_of_outputs(capsys, tmp_path, base, reward_model):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data, training={"weights": [0.5, 0.5]},
                               margins=[{"type": "reward_model", "model": reward_model, "outputs": [5]}])
    assert_fails(capsys, ["train", "--config", config], out, "margins[0]", "has 1 outputs", "[5]")


def test_margin_column_not_in_the_data(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data, training={"weights": [0.5, 0.5]},
                               margins=[{"type": "columns", "chosen": ["score_a"], "rejected": ["score_b"]}])
    assert_fails(capsys, ["train", "--config", config], out, "score_a")


# ------------------------------------------------------------------------------------ config files


def test_yaml_config_with_an_unknown_key(capsys, tmp_path, base):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", {"model": base, "output_dir": str(out), "train_data": "x.jsonl",
                                                "learning_rate": 1e-3})
    line = assert_fails(capsys, ["train", "--config", config], out, config, "unknown key 'learning_rate'")
    assert "(known: model, output_dir, train_data" in line


def test_yaml_config_with_a_wrong_type(capsys, tmp_path, base):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", {"model": base, "output_dir": str(out), "train_data": "x.jsonl",
                                                "num_labels": "two"})
    assert_fails(capsys, ["reward", "--config", config], out, config, "key 'num_labels' should be", "got str 'two'")
    config = write_config(tmp_path / "c.yaml", {"model": base, "output_dir": str(out), "train_data": "x.jsonl",
                                                "training": [1, 2]})
    assert_fails(capsys, ["train", "--config", config], out, config, "key 'training' should be", "got list")


def test_config_missing_a_required_key(capsys, tmp_path, base):
    config = write_config(tmp_path / "c.yaml", {"model": base, "train_data": "x.jsonl"})
    assert_fails(capsys, ["train", "--config", config], None, config, "missing required key(s) output_dir")


def test_config_that_is_not_a_mapping(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("- model\n- output_dir\n")
    assert_fails(capsys, ["train", "--config", str(config)], None, str(config), "expected a mapping of settings")


def test_invalid_yaml(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: [unclosed\noutput_dir: out\n")
    assert_fails(capsys, ["train", "--config", str(config)], None, str(config), "not valid YAML")


def test_invalid_yaml_names_the_line(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: m\noutput_dir: [unclosed\ntrain_data: x.jsonl\n")
    assert_fails(capsys, ["train", "--config", str(config)], None, str(config), "line ")


def test_missing_config_file(capsys, tmp_path):
    config = tmp_path / "absent.yaml"
    assert_fails(capsys, ["sft", "--config", str(config)], None, f"config file {config} does not exist")


def test_bad_overrides(capsys, tmp_path, base):
    out = tmp_path / "out"
    common = ["train", f"model={base}", f"output_dir={out}", "train_data=x.jsonl"]
    assert_fails(capsys, common + ["training"], out, "override 'training' is not of the form key.path=value")
    assert_fails(capsys, common + ["training.beta=[0.1"], out, "override 'training.beta=[0.1': value is not valid YAML")
    assert_fails(capsys, common + ["model.name=x"], out, "override 'model.name=x': 'model' is not a mapping")


def test_output_dir_holding_a_different_run(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data)
    code, _, _ = run(capsys, "train", "--config", config)
    assert code == 0
    record = (out / "modpo_run.json").read_text()
    files = sorted(p.name for p in out.iterdir())
    line = assert_fails(capsys, ["train", "--config", config, "training.beta=0.3"], None,
                        f"{out} already holds a different train run", "--overwrite")
    assert line.endswith("choose another output_dir or pass --overwrite")
    assert_fails(capsys, ["dpo", "--config", config], None, f"{out} already holds a different train run")
    # the finished run is untouched
    assert (out / "modpo_run.json").read_text() == record
    assert sorted(p.name for p in out.iterdir()) == files


def test_resume_without_a_checkpoint(capsys, tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    config, out = train_config(tmp_path, base, data)
    assert_fails(capsys, ["train", "--config", config, "--resume"], out, "checkpoint", str(out))


# --------------------------------------------------------------------------------------- front, demo


def test_front_without_evaluators(capsys, tmp_path, base):
    out = tmp_path / "front"
    config = write_config(tmp_path / "front.yaml", {
        "output_dir": str(out), "weights": [[1.0]],
        "train": {"model": base, "train_data": write_jsonl(tmp_path / "pairs.jsonl", GOOD), "training": TRAINING},
        "evaluation": {"prompts": ["p0"]}})
    assert_fails(capsys, ["front", "--config", config], out, "evaluation.evaluators: give at least one evaluator")


def test_front_unknown_evaluation_key(capsys, tmp_path, base):
    out = tmp_path / "front"
    config = write_config(tmp_path / "front.yaml", {
        "output_dir": str(out), "weights": [[1.0]], "train": {"model": base, "train_data": "x.jsonl"},
        "evaluation": {"prompts": ["p0"], "evaluators": [{"type": "demo_exact"}], "temprature": 0.5}})
    assert_fails(capsys, ["front", "--config", config], out, "evaluation: unknown key(s) temprature")


def test_front_weights_not_vectors(capsys, tmp_path, base):
    out = tmp_path / "front"
    config = write_config(tmp_path / "front.yaml", {
        "output_dir": str(out), "weights": [0.2, 0.8], "train": {"model": base, "train_data": "x.jsonl"},
        "evaluation": {"prompts": ["p0"], "evaluators": [{"type": "demo_exact"}]}})
    assert_fails(capsys, ["front", "--config", config], out, "weights: give a list of weight vectors")


def test_demo_weights_not_numbers(capsys, tmp_path):
    out = tmp_path / "demo"
    assert_fails(capsys, ["demo", "--output-dir", str(out), "--weights", "0.2,half"], out,
                 "--weights '0.2,half': expected comma-separated numbers")
