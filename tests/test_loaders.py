"""Loaders on the shared real samples (skipped when ../shared/data is absent) and on bad input."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from modpo.data.formats import check_preference_row, tokenize_preferences
from modpo.data.loaders import (
    LOADERS,
    load_attribute_ratings,
    load_dataset_from_config,
    load_hh_rlhf,
    load_pku_saferlhf,
    load_preferences,
    load_qa_feedback,
    load_ultrafeedback,
    read_records,
)
from modpo.errors import ConfigError, DataError

import tiny

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"shared sample {name} not available")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def numbered_lines(path: Path) -> dict[int, dict]:
    """{file line number: record} of a JSONL (or .jsonl.gz) file, read here without the loaders' reader."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        return {number: json.loads(line) for number, line in enumerate(lines, start=1) if line.strip()}


def assert_names(error: pytest.ExceptionInfo[DataError], file: Path, row: int, field: str | None) -> None:
    message = str(error.value)
    assert file.name in message and f"row {row}" in message
    if field is not None:
        assert f"'{field}'" in message
    assert (error.value.row, error.value.field) == (row, field)


# ---------------------------------------------------------------------------------- read_records

ROWS = [{"prompt": "p1", "chosen": "a", "rejected": "b"}, {"prompt": "p2", "chosen": "c", "rejected": "d"}]


def test_read_records_reads_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "x.jsonl", ROWS)
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    as_list = tmp_path / "x.json"
    as_list.write_text(json.dumps(ROWS))
    parquet = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    for path in (jsonl, gz, as_list, parquet):
        assert read_records(path) == ROWS


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "p", "chosen": \n')
    with pytest.raises(DataError, match="malformed JSON") as error:
        read_records(path)
    assert_names(error, path, 3, None)  # the blank line 2 still counts


def test_unsupported_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="unsupported file type"):
        read_records(write_jsonl(tmp_path / "x.csv", ROWS))
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "absent.jsonl")


def test_non_object_row(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([ROWS[0], ["not", "an", "object"]]))
    with pytest.raises(DataError, match="expected a JSON object") as error:
        read_records(path)
    assert_names(error, path, 2, None)


# ---------------------------------------------------------------------------------- PKU-SafeRLHF


def test_pku_saferlhf_chosen_follows_the_objective():
    path = shared("pku_saferlhf_alpaca7b_sample.jsonl")
    raw = read_records(path)
    for objective in ("better", "safer"):
        data = load_pku_saferlhf(path, objective=objective)
        assert len(data) == len(raw)
        for record, source in zip(data, raw):
            chosen_id = source[f"{objective}_response_id"]
            assert record["chosen"] == source[f"response_{chosen_id}"]
            assert record["rejected"] == source[f"response_{1 - chosen_id}"]
            assert record[f"{objective}_is_chosen"]
            assert record["is_chosen_safe"] == source[f"is_response_{chosen_id}_safe"]

    disagreements = sum(row["better_response_id"] != row["safer_response_id"] for row in raw)
    better = load_pku_saferlhf(path, objective="better")
    assert sum(not agrees for agrees in better["safer_is_chosen"]) == disagreements
    assert 0.20 < disagreements / len(raw) < 0.26  # "disagree on 23% of pairs" (data README)


def test_pku_saferlhf_bad_label(tmp_path):
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 2,
           "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": False}
    path = write_jsonl(tmp_path / "pku.jsonl", [row])
    with pytest.raises(DataError, match="expected 0 or 1") as error:
        load_pku_saferlhf(path)
    assert_names(error, path, 1, "better_response_id")
    with pytest.raises(ConfigError):
        load_pku_saferlhf(path, objective="kinder")


# --------------------------------------------------------------------------------------- HH-RLHF


def test_hh_rlhf_prompt_is_the_shared_prefix():
    path = shared("hh_rlhf_harmless_base_test.jsonl.gz")
    raw = numbered_lines(path)
    data = load_hh_rlhf(path)
    for record in data:
        source = raw[record["source_row"]]
        prompt = record["prompt"]
        assert prompt.startswith("\n\nHuman:") and prompt.endswith("\n\nAssistant:")
        assert source["chosen"] == prompt + record["chosen"]
        assert source["rejected"] == prompt + record["rejected"]
        assert record["chosen"] != record["rejected"]


def test_hh_rlhf_as_messages():
    path = shared("hh_rlhf_harmless_base_test.jsonl.gz")
    text, chat = load_hh_rlhf(path), load_hh_rlhf(path, as_messages=True)
    for plain, record in zip(text.select(range(200)), chat.select(range(200))):
        assert record["source_row"] == plain["source_row"]
        assert record["prompt"][0]["role"] == "user"
        turns = plain["prompt"].count("\n\nHuman:") + plain["prompt"].count("\n\nAssistant:") - 1
        assert len(record["prompt"]) == turns
        assert record["chosen"] == [{"role": "assistant", "content": plain["chosen"].strip()}]


def test_hh_rlhf_without_an_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hey"}])
    with pytest.raises(DataError, match="Assistant") as error:
        load_hh_rlhf(path)
    assert_names(error, path, 1, "chosen")


# ---------------------------------------------------------------------------------- UltraFeedback


@pytest.mark.parametrize("name",
                         ["ultrafeedback_binarized_train1000.jsonl", "ultrafeedback_binarized_eval200.jsonl"])
def test_ultrafeedback_scores_become_columns(name):
    path = shared(name)
    raw = numbered_lines(path)
    data = load_ultrafeedback(path)
    kept = [raw[line] for line in data["source_row"]]
    assert data["score_chosen"] == [row["metadata"]["score_chosen"] for row in kept]
    assert data["score_rejected"] == [row["metadata"]["score_rejected"] for row in kept]
    assert data["prompt"] == [row["prompt"] for row in kept]
    assert data["chosen"] == [row["chosen"] for row in kept]


def test_ultrafeedback_conversations_are_split(tmp_path):
    user = {"role": "user", "content": "hi"}
    row = {"prompt": "hi", "chosen": [user, {"role": "assistant", "content": "hello"}],
           "rejected": [user, {"role": "assistant", "content": "go away"}], "score_chosen": 9, "score_rejected": 2}
    data = load_ultrafeedback(write_jsonl(tmp_path / "uf.jsonl", [row]))
    assert data[0]["prompt"] == [user]
    assert data[0]["chosen"] == [{"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "uf_bad.jsonl", [row, {**row, "score_rejected": "low"}])
    with pytest.raises(DataError) as error:
        load_ultrafeedback(path)
    assert_names(error, path, 2, "score_rejected")


# ------------------------------------------------------------------- pairs that carry no preference

ASSISTANT_TURN = "\n\nAssistant:"


def hh_without_preference(row: dict) -> bool:
    """An empty answer after the dialogue's last assistant turn, or two identical dialogues."""
    return any(not row[side].rsplit(ASSISTANT_TURN, 1)[-1].strip() for side in ("chosen", "rejected")) or (
        row["chosen"] == row["rejected"]
    )


def ultrafeedback_without_preference(row: dict) -> bool:
    return not row["chosen"].strip() or not row["rejected"].strip() or row["chosen"] == row["rejected"]


@pytest.mark.parametrize(
    ("name", "loader", "without_preference"),
    [
        ("hh_rlhf_harmless_base_test.jsonl.gz", load_hh_rlhf, hh_without_preference),
        ("ultrafeedback_binarized_train1000.jsonl", load_ultrafeedback, ultrafeedback_without_preference),
        ("ultrafeedback_binarized_eval200.jsonl", load_ultrafeedback, ultrafeedback_without_preference),
    ],
)
def test_loaders_drop_pairs_without_preference_and_say_so(caplog, name, loader, without_preference):
    path = shared(name)
    raw = numbered_lines(path)
    expected_dropped = [line for line, row in raw.items() if without_preference(row)]
    assert expected_dropped  # the shipped files do have such pairs
    with caplog.at_level(logging.WARNING, logger="modpo.data.loaders"):
        data = loader(path)
    assert sorted(set(raw) - set(data["source_row"])) == expected_dropped
    for record in data:
        check_preference_row(record, record["source_row"], str(path))
    warning = caplog.text
    assert f"dropped {len(expected_dropped)} of {len(raw)} pairs" in warning
    assert all(str(line) in warning for line in expected_dropped[:3])


@pytest.mark.parametrize(
    ("name", "loader", "options"),
    [
        ("hh_rlhf_harmless_base_test.jsonl.gz", load_hh_rlhf, {"as_messages": True}),
        ("pku_saferlhf_alpaca7b_sample.jsonl", load_pku_saferlhf, {"objective": "safer"}),
        ("qa_feedback_dev_feedback.json", load_qa_feedback, {"objective": "preference"}),
        ("qa_feedback_dev_feedback.json", load_qa_feedback, {"objective": "relevance"}),
    ],
)
def test_every_loaded_pair_passes_the_trainer_check(name, loader, options):
    path = shared(name)
    data = loader(path, **options)
    for record in data:
        check_preference_row(record, record["source_row"], str(path))


def pku_row(prompt: str, response_0: str = "a", response_1: str = "b") -> dict:
    return {"prompt": prompt, "response_0": response_0, "response_1": response_1, "better_response_id": 0,
            "safer_response_id": 1, "is_response_0_safe": True, "is_response_1_safe": False}


def test_named_loader_drops_a_pair_without_preference(tmp_path, caplog):
    rows = [pku_row("p0"), pku_row("p1", "same", "same"), pku_row("p2", "a", " "), pku_row("p3")]
    path = write_jsonl(tmp_path / "pku.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="modpo.data.loaders"):
        data = load_pku_saferlhf(path)
    usable = [line for line, row in enumerate(rows, start=1) if row["response_0"].strip()
              and row["response_1"].strip() and row["response_0"] != row["response_1"]]
    assert data["source_row"] == usable
    assert f"dropped {len(rows) - len(usable)} of {len(rows)} pairs" in caplog.text
    assert "'chosen' identical to 'rejected': 1 (row 2)" in caplog.text
    assert "'rejected' is empty: 1 (row 3)" in caplog.text


# ------------------------------------------------------------------------------------ QA-Feedback

QA_ORDER = [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]


def test_qa_feedback_preference_pairs_match_the_labels(caplog):
    path = shared("qa_feedback_dev_feedback.json")
    raw = read_records(path)
    expected = [
        (f"prediction {first if label == 1 else second}", f"prediction {second if label == 1 else first}", row)
        for row in raw
        for (first, second), label in zip(QA_ORDER, row["preference"])
        if label != 0
    ]
    with caplog.at_level(logging.WARNING):
        data = load_qa_feedback(path)
    assert len(data) == len(expected)
    for record, (chosen, rejected, row) in zip(data, expected):
        assert record["chosen"] == row[chosen].strip()
        assert record["rejected"] == row[rejected].strip()
        assert record["chosen_id"] == int(chosen[-1])
        assert record["prompt"].startswith(f"Question: {row['question'].strip()}\n")
    zeros = sum(label == 0 for row in raw for label in row["preference"])
    assert f"skipped {zeros} pairs" in caplog.text


@pytest.mark.parametrize(
    ("objective", "kinds"),
    [("factuality", {"Wrong-Grounding", "Unverifiable"}), ("relevance", {"Irrelevant", "Redundant", "Incoherent"}),
     ("completeness", None)],
)
def test_qa_feedback_fine_grained_pairs(objective, kinds):
    path = shared("qa_feedback_dev_feedback.json")

    def problems(row: dict) -> int:
        feedback = row["feedback"]
        if kinds is None:
            return len(feedback["missing-info"])
        return sum(error["error type"] in kinds for error in feedback["errors"])

    raw = read_records(path)
    expected = [row for row in raw if problems(row) and row["feedback"]["corrected-prediction"].strip()]
    data = load_qa_feedback(path, objective=objective)
    assert len(data) == len(expected)
    assert data["rejected_error_count"] == [problems(row) for row in expected]
    assert set(data["chosen_error_count"]) == {0}
    assert data["chosen"] == [row["feedback"]["corrected-prediction"].strip() for row in expected]
    assert data["rejected"] == [row["prediction 1"].strip() for row in expected]


def test_qa_feedback_bad_preference_labels(tmp_path):
    row = {"question": "q?", "passages": [["T", "s."]], "feedback": {},
           **{f"prediction {i}": f"answer {i}" for i in range(1, 5)}, "preference": [1, 2, 0]}
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([row]))
    with pytest.raises(DataError, match="6 labels") as error:
        load_qa_feedback(path)
    assert_names(error, path, 1, "preference")


# ------------------------------------------------------------------------------ attribute ratings


def test_attribute_ratings_pairs_by_first_attribute(tmp_path, caplog):
    def rated(prompt: str, response: str, helpfulness: int, correctness: int, verbosity: int) -> dict:
        return {"prompt": prompt, "response": response, "helpfulness": helpfulness,
                "correctness": correctness, "verbosity": verbosity}

    path = write_jsonl(tmp_path / "helpsteer.jsonl", [
        rated("A", "a1", 2, 3, 1), rated("B", "b1", 3, 3, 3), rated("A", "a2", 4, 1, 2),
        rated("B", "b2", 3, 0, 0), rated("A", "a3", 2, 4, 4),
    ])
    with caplog.at_level(logging.WARNING):
        data = load_attribute_ratings(path, ["helpfulness", "correctness", "verbosity"])
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in data] == [("A", "a2", "a1"), ("A", "a2", "a3")]
    assert data[0]["chosen_margins"] == [1.0, 2.0] and data[0]["rejected_margins"] == [3.0, 1.0]
    assert data["score_chosen"] == [4.0, 4.0]
    assert "skipped 2 pairs tied on 'helpfulness'" in caplog.text  # a1/a3 and b1/b2

    bad = write_jsonl(tmp_path / "bad.jsonl", [rated("A", "a1", 2, 3, 1), {"prompt": "A", "response": "a2"}])
    with pytest.raises(DataError, match="missing column") as error:
        load_attribute_ratings(bad, ["helpfulness"])
    assert_names(error, bad, 2, "helpfulness")


# ------------------------------------------------------------------------------ load_preferences

MAPPING = {"prompt": "question", "chosen": "answers.good", "rejected": "answers.bad",
           "chosen_margins": ["s1_good"], "rejected_margins": ["s1_bad"], "length": "meta.length"}


def custom_row(**overrides) -> dict:
    row = {"question": "why?", "answers": {"good": "because", "bad": "no"}, "s1_good": 0.5, "s1_bad": -1,
           "meta": {"length": 7}}
    return {**row, **overrides}


def test_load_preferences_maps_columns(tmp_path):
    data = load_preferences(write_jsonl(tmp_path / "p.jsonl", [custom_row(), custom_row()]), MAPPING)
    assert data[0] == {"prompt": "why?", "chosen": "because", "rejected": "no",
                       "chosen_margins": [0.5], "rejected_margins": [-1.0], "length": 7.0, "source_row": 1}
    assert data[1]["source_row"] == 2  # the file's own line number, for later error messages


def test_load_preferences_defaults_and_messages(tmp_path):
    user, answer = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    rows = [{"prompt": [user], "chosen": [answer], "rejected": [{"role": "assistant", "content": "bye"}],
             "chosen_margins": [1, 2], "rejected_margins": [0, 0]}]
    data = load_preferences(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert data[0]["prompt"] == [user] and data[0]["chosen_margins"] == [1.0, 2.0]


@pytest.mark.parametrize(
    ("bad_row", "field", "message"),
    [
        (custom_row(question=""), "question", "is empty"),
        (custom_row(s1_bad=float("nan")), "s1_bad", "finite"),
        ({k: v for k, v in custom_row().items() if k != "question"}, "question", "missing column"),
        (custom_row(answers={"good": "yes"}), "answers.bad", "missing column"),
        (custom_row(answers={"good": [{"role": "assistant", "content": "x"}], "bad": "no"}), "answers.good",
         "must be text"),
        (custom_row(meta={"length": "long"}), "meta.length", "expected a number"),
        (custom_row(answers={"good": " ", "bad": "no"}), "answers.good", "is empty"),
        (custom_row(answers={"good": "no", "bad": "no"}), "answers.good", "identical to 'rejected'"),
    ],
)
def test_load_preferences_bad_rows_name_file_row_field(tmp_path, bad_row, field, message):
    path = write_jsonl(tmp_path / "prefs.jsonl", [custom_row(), bad_row])
    with pytest.raises(DataError, match=message) as error:
        load_preferences(path, MAPPING)
    assert_names(error, path, 2, field)


def test_load_preferences_margins_in_later_rows_only_are_required_in_every_row(tmp_path):
    with_margins = {**ROWS[1], "chosen_margins": [1.0], "rejected_margins": [0.0]}
    path = write_jsonl(tmp_path / "late_margins.jsonl", [ROWS[0], with_margins])
    with pytest.raises(DataError, match="missing column") as error:
        load_preferences(path)
    assert_names(error, path, 1, "chosen_margins")
    data = load_preferences(write_jsonl(tmp_path / "margins.jsonl", [with_margins, with_margins]))
    assert data["chosen_margins"] == [with_margins["chosen_margins"]] * 2


def test_load_preferences_extra_columns_come_from_every_row(tmp_path):
    rows = [{**ROWS[0], "score": 3, "label": 1}, {**ROWS[1], "label": "good"}, {**ROWS[0], "safe": True}]
    data = load_preferences(write_jsonl(tmp_path / "extras.jsonl", rows))
    assert data["score"] == [row.get("score") for row in rows]
    assert data["safe"] == [row.get("safe") for row in rows]
    assert "label" not in data.column_names  # numbers in one row, text in another: not a number column
    assert data["source_row"] == [1, 2, 3]


def test_load_preferences_bad_message(tmp_path):
    rows = [{"prompt": [{"role": "narrator", "content": "x"}], "chosen": [], "rejected": []}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match="expected one of") as error:
        load_preferences(path)
    assert_names(error, path, 1, "prompt[0].role")


# ------------------------------------------------------------------------------- config, splits


def test_registry_names_every_loader():
    assert set(LOADERS) == {"pku_saferlhf", "hh_rlhf", "ultrafeedback", "qa_feedback", "attribute_ratings", "jsonl"}
    assert LOADERS["jsonl"] is load_preferences


def test_config_split_is_deterministic_and_keeps_prompts_together():
    path = shared("qa_feedback_dev_feedback.json")
    spec = {"loader": "qa_feedback", "path": str(path), "objective": "preference"}
    full = load_dataset_from_config(spec)
    parts = {
        part: load_dataset_from_config({**spec, "split": {"test_fraction": 0.2, "seed": 3, "part": part}})
        for part in ("train", "test")
    }
    assert len(parts["train"]) + len(parts["test"]) == len(full)
    assert not set(parts["train"]["prompt"]) & set(parts["test"]["prompt"])
    test_prompts = len(set(parts["test"]["prompt"]))
    assert test_prompts == round(0.2 * len(set(full["prompt"])))
    again = load_dataset_from_config({**spec, "split": {"test_fraction": 0.2, "seed": 3, "part": "test"}})
    assert again["chosen"] == parts["test"]["chosen"]
    other_seed = load_dataset_from_config({**spec, "split": {"test_fraction": 0.2, "seed": 4, "part": "test"}})
    assert other_seed["prompt"] != parts["test"]["prompt"]
    test_split = {"test_fraction": 0.2, "seed": 3, "part": "test"}
    limited = load_dataset_from_config({**spec, "split": test_split, "limit": 5})
    assert limited["chosen"] == parts["test"]["chosen"][:5]
    assert limited["source_row"] == parts["test"]["source_row"][:5]


def test_trainer_errors_name_the_file_line_after_split_and_limit(tmp_path):
    too_long = "p0 p1 p2 p3 p0 p1 p2 p3"
    prompts = ["p0", "p1", "p2", "p3", "p0 p1", "p1 p2", "p2 p3", too_long]
    lines = [json.dumps(pku_row(prompt)) for prompt in prompts]
    lines.insert(2, "")  # a blank line still counts
    path = tmp_path / "pku.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    line_of = {json.loads(line)["prompt"]: number for number, line in enumerate(lines, start=1) if line}

    spec = {"loader": "pku_saferlhf", "path": str(path)}
    splits = [{"test_fraction": 0.5, "seed": 1, "part": part} for part in ("train", "test")]
    split = next(s for s in splits if too_long in load_dataset_from_config({**spec, "split": s})["prompt"])
    position = load_dataset_from_config({**spec, "split": split})["prompt"].index(too_long)
    assert position + 1 != line_of[too_long]  # the data set's own index would name the wrong row
    data = load_dataset_from_config({**spec, "split": split, "limit": position + 1})
    assert data["source_row"] == [line_of[prompt] for prompt in data["prompt"]]
    with pytest.raises(DataError, match="max_length") as error:
        tokenize_preferences(data, tiny.tokenizer(), max_length=6, file=str(path), long_prompts="refuse")
    assert_names(error, path, line_of[too_long], "prompt")


@pytest.mark.parametrize(
    "spec",
    [
        {"loader": "nope", "path": "x.jsonl"},
        {"loader": "jsonl"},
        {"loader": "jsonl", "path": "x.jsonl", "colums": {}},
        {"loader": "jsonl", "path": "x.jsonl", "split": {"test_fraction": 1.5}},
        {"loader": "jsonl", "path": "x.jsonl", "split": {"fraction": 0.2}},
        {"loader": "jsonl", "path": "x.jsonl", "limit": -1},
    ],
)
def test_config_errors(tmp_path, spec):
    write_jsonl(tmp_path / "x.jsonl", ROWS)
    if "path" in spec:
        spec = {**spec, "path": str(tmp_path / spec["path"])}
    with pytest.raises(ConfigError):
        load_dataset_from_config(spec)
