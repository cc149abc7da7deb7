"""Preference rows -> token ids -> padded batches, and the checks that name file, row and field."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from datasets import Dataset

from modpo.batch import PreferenceCollator
from modpo.data.encode import encode, sequence_ids
from modpo.data.formats import check_preference_row, tokenize_preferences, tokenize_reward_pairs
from modpo.errors import DataError

import tiny


def ids(tok, text: str) -> list[int]:
    """Token ids of whitespace-separated words, looked up in the vocabulary directly."""
    vocab = tok.get_vocab()
    return [vocab[w] for w in text.split()]


# ------------------------------------------------------------------------------------------------ tokenizing

def test_text_rows():
    tok = tiny.tokenizer()
    rows = tiny.rows(5, seed=1)
    out = tokenize_preferences(Dataset.from_list(rows), tok, max_length=64, file="train.jsonl")
    eos = tok.eos_token_id
    for i, row in enumerate(rows):
        assert out[i]["prompt_ids"] == ids(tok, row["prompt"])
        assert out[i]["chosen_ids"] == ids(tok, row["chosen"]) + [eos]
        assert out[i]["rejected_ids"] == ids(tok, row["rejected"]) + [eos]
        assert out[i]["row_index"] == i
    assert {"prompt", "chosen", "rejected"} <= set(out.column_names)  # the text stays beside the ids


def test_eos_not_doubled_and_can_be_left_out():
    tok = tiny.tokenizer()
    data = Dataset.from_list([{"prompt": "p0", "chosen": "a b <eos>", "rejected": "c"}])
    with_eos = tokenize_preferences(data, tok, max_length=64)[0]
    assert with_eos["chosen_ids"] == ids(tok, "a b") + [tok.eos_token_id]
    without = tokenize_preferences(data, tok, max_length=64, append_eos=False)[0]
    assert without["rejected_ids"] == ids(tok, "c")
    assert without["chosen_ids"] == ids(tok, "a b") + [tok.eos_token_id]  # the text's own eos stays


def test_chat_rows_use_the_template_and_share_the_prompt():
    tok = tiny.tokenizer(chat=True)
    rows = [
        {"prompt": [{"role": "system", "content": "p3"}, {"role": "user", "content": "p0 p1"}],
         "chosen": [{"role": "assistant", "content": "a b"}], "rejected": [{"role": "assistant", "content": "c"}]},
        {"prompt": "p2", "chosen": [{"role": "assistant", "content": "d"}],  # text prompt -> one user message
         "rejected": [{"role": "assistant", "content": "e f g"}]},
    ]
    # Render the template here by hand: "<role> content <eos> " per message, then "<assistant> " to prompt a reply.
    expected_prompts = ["<system> p3 <eos> <user> p0 p1 <eos> <assistant>", "<user> p2 <eos> <assistant>"]
    for row, expected in zip(rows, expected_prompts):
        prompt_ids, _ = encode(row["prompt"], [row["chosen"], row["rejected"]], tok)
        assert prompt_ids == ids(tok, expected)
    out = tokenize_preferences(Dataset.from_list([rows[0]]), tok, max_length=64)
    second = tokenize_preferences(Dataset.from_list([rows[1]]), tok, max_length=64)[0]
    first = out[0]
    eos = tok.eos_token_id
    assert first["prompt_ids"] == ids(tok, expected_prompts[0])
    assert first["chosen_ids"] == ids(tok, "a b") + [eos] and first["rejected_ids"] == ids(tok, "c") + [eos]
    assert second["prompt_ids"] == ids(tok, expected_prompts[1])
    assert second["rejected_ids"] == ids(tok, "e f g") + [eos]


def test_chat_rows_without_a_template_name_the_field():
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "p0"}],
                               "chosen": [{"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError) as error:
        tokenize_preferences(data, tiny.tokenizer(), max_length=64, file="chat.jsonl")
    assert str(error.value).startswith("chat.jsonl[0], ") and "chat template" in str(error.value)
    assert error.value.field == "chosen"


def test_long_responses_are_truncated_counted_and_logged(caplog):
    tok = tiny.tokenizer()
    max_length = 6
    rows = [
        {"prompt": "p0 p1 p2", "chosen": "a b c d e", "rejected": "a"},     # chosen 6 > room 3
        {"prompt": "p0", "chosen": "a b", "rejected": "c d e f g h"},       # rejected 7 > room 5
        {"prompt": "p1 p2", "chosen": "a b c", "rejected": "d e f"},        # 4 = room 4: fits
        {"prompt": "p0 p0 p0 p0", "chosen": "a b", "rejected": "c d e"},    # both > room 2
    ]
    expected_truncated = sum(len(r[side].split()) + 1 > max_length - len(r["prompt"].split())
                             for r in rows for side in ("chosen", "rejected"))
    with caplog.at_level(logging.WARNING, logger="modpo.data.formats"):
        out = tokenize_preferences(Dataset.from_list(rows), tok, max_length=max_length, file="long.jsonl")
    for i, row in enumerate(rows):
        assert out[i]["prompt_ids"] == ids(tok, row["prompt"])  # the prompt is never cut
        room = max_length - len(row["prompt"].split())
        for side in ("chosen", "rejected"):
            full = ids(tok, row[side]) + [tok.eos_token_id]
            assert out[i][f"{side}_ids"] == full[:room]
            assert len(out[i]["prompt_ids"]) + len(out[i][f"{side}_ids"]) <= max_length
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("long.jsonl" in m and f"{expected_truncated} of {2 * len(rows)}" in m and "truncated" in m
               for m in messages), messages


def test_no_warning_when_nothing_is_truncated(caplog):
    with caplog.at_level(logging.WARNING, logger="modpo.data.formats"):
        tokenize_preferences(Dataset.from_list(tiny.rows(3)), tiny.tokenizer(), max_length=64)
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]


LONG = [{"prompt": "p0", "chosen": "a", "rejected": "b"},
        {"prompt": "p0 p1 p2 p3 p0 p1", "chosen": "a b", "rejected": "c"},
        {"prompt": "p1", "chosen": "c", "rejected": "d e"}]


def test_long_prompt_is_refused_on_request():
    with pytest.raises(DataError) as error:
        tokenize_preferences(Dataset.from_list(LONG), tiny.tokenizer(), max_length=6, file="train_dataset",
                             long_prompts="refuse")
    message = str(error.value)
    assert message.startswith("train_dataset[1], field 'prompt': 6 tokens") and "max_length=6" in message
    assert (error.value.index, error.value.field) == (1, "prompt")


def test_long_prompt_keeps_its_end_by_default(caplog):
    tok = tiny.tokenizer()
    with caplog.at_level(logging.WARNING, logger="modpo.data.encode"):
        out = tokenize_preferences(Dataset.from_list(LONG), tok, max_length=6, file="train_dataset")
    assert len(out) == 3
    assert out[1]["prompt_ids"] == ids(tok, "p0 p1 p2 p3 p0 p1")[-3:]  # the last max_length // 2 tokens
    assert out[1]["chosen_ids"] == ids(tok, "a b") + [tok.eos_token_id]
    assert out[0]["prompt_ids"] == ids(tok, "p0")  # rows that fit are untouched
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == ["train_dataset: 1 of 3 prompts were too long for max_length=6 and were cut from the left, "
                     "keeping their end (indexes 1)"]


def test_long_prompt_row_is_dropped_on_request(caplog):
    tok = tiny.tokenizer()
    rows = [{**row, "source_row": 10 + i} for i, row in enumerate(LONG)]  # as the loaders keep the file's lines
    with caplog.at_level(logging.WARNING, logger="modpo.data.encode"):
        out = tokenize_preferences(Dataset.from_list(rows), tok, max_length=6, file="prefs.jsonl", long_prompts="drop")
    assert out["row_index"] == [0, 2] and out["prompt_ids"] == [ids(tok, "p0"), ids(tok, "p1")]
    assert any("prefs.jsonl: 1 of 3 rows were dropped" in r.getMessage() and "(rows 11)" in r.getMessage()
               for r in caplog.records)


def test_max_prompt_length_makes_prompts_long():
    tok = tiny.tokenizer()
    out = tokenize_preferences(Dataset.from_list(LONG), tok, max_length=64, max_prompt_length=2)
    assert out[1]["prompt_ids"] == ids(tok, "p0 p1")  # its last two tokens
    assert out[0]["prompt_ids"] == ids(tok, "p0")


def test_an_empty_dataset_is_one_clear_error():
    with pytest.raises(DataError) as error:
        tokenize_preferences(Dataset.from_list([]), tiny.tokenizer(), max_length=8, file="train_dataset")
    assert str(error.value) == "train_dataset: no rows"


def test_response_that_tokenizes_to_nothing_is_refused():
    """Non-empty text can still give no token ids (a tokenizer that normalises it away); with no eos appended
    there would be nothing to score, and the pair would carry no preference."""
    tok = tiny.tokenizer()

    class DropsB:  # the word tokenizer, except that the word "b" vanishes
        eos_token_id = tok.eos_token_id
        chat_template = None

        def __call__(self, text, add_special_tokens=True):
            ids = tok(text, add_special_tokens=add_special_tokens)["input_ids"]
            return {"input_ids": [] if text.strip() == "b" else ids}

    rows = [{"prompt": "p0", "chosen": "a", "rejected": "b"}]
    with pytest.raises(DataError) as error:
        tokenize_preferences(Dataset.from_list(rows), DropsB(), max_length=8, file="prefs.jsonl", append_eos=False)
    assert (error.value.index, error.value.field) == (0, "rejected") and "tokenizes to no tokens" in str(error.value)


# ------------------------------------------------------------------------------------------------ collating

def test_collator_shapes_and_masks():
    tok = tiny.tokenizer()
    rows = tiny.rows(4, seed=3, num_margins=2)
    tokenized = tokenize_preferences(Dataset.from_list(rows), tok, max_length=64, num_margins=2)
    features = []
    for i, f in enumerate(tokenized):
        features.append({**f, "ref_chosen_logps": -1.0 - i, "ref_rejected_logps": -2.0 - i})
    batch = PreferenceCollator(pad_token_id=tok.pad_token_id)(features)
    layout = batch["layout"]  # what the model and the log-prob extraction read; the rest is for the loss
    pairs = len(features)
    lengths = [len(f["prompt_ids"]) + len(f[f"{side}_ids"]) for side in ("chosen", "rejected") for f in features]
    assert layout["input_ids"].shape == (2 * pairs, max(lengths))
    assert layout["attention_mask"].shape == layout["input_ids"].shape
    assert layout["attention_mask"].sum(dim=1).tolist() == lengths
    width = layout["input_ids"].shape[1]
    for row in range(2 * pairs):
        f, side = features[row % pairs], ("chosen", "rejected")[row // pairs]
        prompt, response = f["prompt_ids"], f[f"{side}_ids"]
        mine = layout["score_sequences"] == row
        # response token t is scored by the hidden state of the token before it, in the same row
        assert (layout["score_positions"][mine] - row * width).tolist() == list(range(len(prompt) - 1, len(prompt) + len(response) - 1))
        assert layout["score_targets"][mine].tolist() == response
        assert layout["input_ids"][row, : len(prompt) + len(response)].tolist() == prompt + response
        assert (layout["input_ids"][row, lengths[row]:] == tok.pad_token_id).all()
        assert (layout["attention_mask"][row, lengths[row]:] == 0).all()
    assert batch["ref_chosen_logps"].tolist() == [-1.0 - i for i in range(pairs)]
    assert batch["ref_rejected_logps"].dtype == torch.float32 and batch["ref_rejected_logps"].shape == (pairs,)
    assert batch["chosen_margins"].shape == batch["rejected_margins"].shape == (pairs, 2)
    assert torch.allclose(batch["chosen_margins"], torch.tensor([r["chosen_margins"] for r in rows]))
    assert batch["row_index"].tolist() == list(range(pairs))


def test_collator_without_optional_columns():
    batch = PreferenceCollator(pad_token_id=0)([{"prompt_ids": [5], "chosen_ids": [6, 2], "rejected_ids": [7, 8, 2]}])
    layout = batch["layout"]
    assert set(batch) == {"layout", "row_index"}
    assert set(layout) == {"input_ids", "attention_mask", "score_positions", "score_targets", "score_sequences"}
    assert layout["input_ids"].tolist() == [[5, 6, 2, 0], [5, 7, 8, 2]]
    assert layout["score_positions"].tolist() == [0, 1, 4, 5, 6]  # flat positions: row 1 starts at 4
    assert layout["score_targets"].tolist() == [6, 2, 7, 8, 2]
    assert layout["score_sequences"].tolist() == [0, 0, 1, 1, 1]
    assert batch["row_index"].tolist() == [-1]


# ------------------------------------------------------------------------------------------------ row checks

GOOD = {"prompt": "p0", "chosen": "a", "rejected": "b", "chosen_margins": [0.5, 1], "rejected_margins": [0.0, -2.5]}
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("change, field, words", [
    ({"prompt": None}, "prompt", "missing"),
    ({"chosen": None}, "chosen", "missing"),
    ({"rejected": "   "}, "rejected", "empty text"),
    ({"prompt": 5}, "prompt", "int"),
    ({"chosen": {"text": "a"}}, "chosen", "dict"),
    ({"prompt": []}, "prompt", "empty message list"),
    ({"prompt": [{"role": "user"}]}, "prompt", "'role' and 'content'"),
    ({"chosen": ["a"]}, "chosen", "message 0"),
    ({"rejected": [{"role": "assistant", "content": 3}]}, "rejected", "must be text"),
    ({"rejected": "a"}, "chosen", "identical"),
    ({"chosen": USER, "rejected": USER}, "chosen", "identical"),
    ({"rejected": [{"role": "assistant", "content": " "}]}, "rejected", "is empty"),
    ({"chosen_margins": [0.5, 1, 2]}, "chosen_margins", "has 3 values, expected 2"),
    ({"rejected_margins": [0.1]}, "rejected_margins", "has 1 values, expected 2"),
    ({"rejected_margins": [0.1, math.nan]}, "rejected_margins", "non-finite"),
    ({"chosen_margins": [math.inf, 0.0]}, "chosen_margins", "non-finite"),
    ({"chosen_margins": ["x", 1.0]}, "chosen_margins", "non-numeric"),
    ({"chosen_margins": [True, 1.0]}, "chosen_margins", "non-numeric"),
    ({"rejected_margins": "0.1 0.2"}, "rejected_margins", "list of numbers"),
])
def test_bad_rows_name_file_row_and_field(change, field, words):
    example = {**GOOD, **change}
    if change.get("prompt", 0) is None:
        del example["prompt"]  # missing entirely, as well as None (below)
    with pytest.raises(DataError) as error:
        check_preference_row(example, 7, file="prefs.jsonl", num_margins=2)
    message = str(error.value)
    assert "prefs.jsonl" in message and "row 7" in message and f"'{field}'" in message and words in message, message
    assert (error.value.file, error.value.row, error.value.field) == ("prefs.jsonl", 7, field)


def test_good_rows_pass():
    check_preference_row(GOOD, 1, num_margins=2)
    check_preference_row({"prompt": USER, "chosen": [{"role": "assistant", "content": "a"}],
                          "rejected": [{"role": "assistant", "content": "b"}]}, 1)
    check_preference_row({**GOOD, "chosen_margins": None, "rejected_margins": None}, 1, num_margins=2)
    check_preference_row({**GOOD, "chosen_margins": [1, 2, 3]}, 1)  # length unchecked without num_margins


def test_tokenize_names_the_failing_row():
    rows = tiny.rows(4, seed=2, num_margins=1)
    rows[2]["rejected_margins"] = [float("nan")]
    with pytest.raises(DataError) as error:
        tokenize_preferences(Dataset.from_list(rows), tiny.tokenizer(), max_length=64, file="m.jsonl", num_margins=1)
    assert str(error.value).startswith("m.jsonl[2], field 'rejected_margins'")  # dataset[2], as Python indexes it
    rows = [{**row, "source_row": i + 1} for i, row in enumerate(rows)]  # rows read from a file name its line
    with pytest.raises(DataError) as error:
        tokenize_preferences(Dataset.from_list(rows), tiny.tokenizer(), max_length=64, file="m.jsonl", num_margins=1)
    assert str(error.value).startswith("m.jsonl, row 3, field 'rejected_margins'")


def test_reward_pairs_keep_every_row_with_the_ids_the_reward_model_is_scored_on(caplog):
    """TRL's RewardTrainer would drop pairs over max_length; the reward stage keeps them, each sequence's end kept
    as reward-model margins score it, and says so in one warning line."""
    rows = tiny.rows(6, seed=3)
    rows[1]["prompt"] = rows[4]["prompt"] = " ".join(["p0", "p1", "p2", "p3"] * 3)
    tok, max_length = tiny.tokenizer(), 8
    long = [i for i, r in enumerate(rows)
            if max(len(tok(r["prompt"])["input_ids"]) + len(tok(r[s], add_special_tokens=False)["input_ids"]) + 1
                   for s in ("chosen", "rejected")) > max_length]
    with caplog.at_level(logging.WARNING):
        out = tokenize_reward_pairs(Dataset.from_list(rows), tok, max_length, "pairs")
    assert len(out) == len(rows)
    for row, example in zip(rows, out):
        for side in ("chosen", "rejected"):
            assert example[f"{side}_ids"] == sequence_ids(row["prompt"], row[side], tok, max_length)
    assert {1, 4} <= set(long)
    assert caplog.messages == [f"pairs: {len(long)} of 6 rows were longer than max_length=8 and keep their end, as "
                               f"the reward model is scored (indexes {', '.join(map(str, long))})"]
