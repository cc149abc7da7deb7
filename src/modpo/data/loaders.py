"""Loaders: public preference data sets -> the project's standard preference records.

A record is a dict with `prompt`, `chosen` and `rejected`: each a str, or for chat data a list of
{"role", "content"} messages (prompt = the conversation before the answer, chosen/rejected = one
assistant message). Optional `chosen_margins` / `rejected_margins` hold one float per extra objective;
other columns are numbers or booleans a recipe may turn into margins. Every record also has `source_row`,
the row of the source file it came from, so that later errors (after `split` or `limit`) still name it.
Every loader returns a `datasets.Dataset` of such records and raises `DataError` (file, 1-based row,
field) on a bad row. A loader that skips rows by design (ties, missing labels) logs how many at WARNING level.

A pair with an empty chosen or rejected answer, or with chosen identical to rejected, carries no preference
for DPO-style training (`modpo.data.formats.missing_preference`, the trainer's own rule). The loaders of
public data sets drop such pairs and log how many, why, and the first few source rows; `load_preferences`,
which reads the user's own file, refuses the first one with a `DataError` instead.

Row numbers are line numbers for JSONL, 1-based element indices for a JSON list and row indices for
parquet.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from datasets import Dataset

from modpo.data.formats import NO_PREFERENCE, missing_preference
from modpo.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

Record = dict[str, Any]
Message = dict[str, str]
PathLike = str | os.PathLike

STANDARD_FIELDS = ("prompt", "chosen", "rejected")
MARGIN_FIELDS = ("chosen_margins", "rejected_margins")
ROLES = frozenset({"system", "user", "assistant", "tool"})
_MISSING = object()
ROWS_NAMED_IN_WARNINGS = 5


# --------------------------------------------------------------------------------------------- files


def read_records(path: PathLike) -> list[Record]:
    """Read .jsonl, .jsonl.gz, .json (a list of objects) or .parquet into a list of dicts."""
    return [record for _, record in _read_numbered(path)]


def _read_numbered(path: PathLike) -> list[tuple[int, Record]]:
    """(row number, record) pairs of a file; see the module docstring for what the row number counts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "no such file")
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            return _read_jsonl(path)
        if name.endswith(".json"):
            return _read_json_list(path)
        if name.endswith(".parquet"):
            return _read_parquet(path)
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise DataError(path, None, None, f"cannot read file: {error}") from None
    raise DataError(path, None, None, "unsupported file type (expected .jsonl, .jsonl.gz, .json or .parquet)")


def _read_jsonl(path: Path) -> list[tuple[int, Record]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                message = f"malformed JSON: {error.msg} (column {error.colno})"
                raise DataError(path, line_number, None, message) from None
            rows.append((line_number, _as_object(record, path, line_number)))
    return rows


def _read_json_list(path: Path) -> list[tuple[int, Record]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        message = f"malformed JSON: {error.msg} (column {error.colno})"
        raise DataError(path, error.lineno, None, message) from None
    if not isinstance(records, list):
        raise DataError(path, None, None, f"expected a JSON list of objects, got {type(records).__name__}")
    return [(index, _as_object(record, path, index)) for index, record in enumerate(records, start=1)]


def _read_parquet(path: Path) -> list[tuple[int, Record]]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(path, None, None, f"cannot read parquet: {error}") from None
    return list(enumerate(records, start=1))


def _as_object(value: Any, file: Path, row: int) -> Record:
    if not isinstance(value, dict):
        raise DataError(file, row, None, f"expected a JSON object, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------ field checks


def _field(record: Mapping[str, Any], path: str, file: PathLike, row: int) -> Any:
    """The value at `path` (a key, or dotted keys into nested objects); DataError when it is missing."""
    value = _lookup(record, path)
    if value is _MISSING:
        raise DataError(file, row, path, "missing column")
    return value


def _lookup(record: Mapping[str, Any], path: str) -> Any:
    if path in record:
        return record[path]
    value: Any = record
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _number(value: Any, file: PathLike, row: int, field: str) -> float:
    """A finite int or float (not a bool) as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(file, row, field, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise DataError(file, row, field, f"expected a finite number, got {value}")
    return float(value)


def _text(value: Any, file: PathLike, row: int, field: str) -> str:
    """A string with some non-whitespace in it."""
    if not isinstance(value, str):
        raise DataError(file, row, field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(file, row, field, "is empty")
    return value


def _messages(value: Any, file: PathLike, row: int, field: str) -> list[Message]:
    """A non-empty list of {"role", "content"} messages, reduced to those two keys."""
    if not isinstance(value, list) or not value:
        raise DataError(file, row, field, "expected a non-empty list of messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise DataError(file, row, f"{field}[{index}]", "expected a {'role', 'content'} object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(file, row, f"{field}[{index}].role", f"expected one of {sorted(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(file, row, f"{field}[{index}].content", "expected a string")
        messages.append({"role": role, "content": content})
    return messages


def _check_record(record: Record, file: PathLike, row: int, sources: Mapping[str, str] | None = None) -> Record:
    """Validate (and normalise messages in) a standard record built by a loader.

    `sources` maps a record field to the file's column it came from, so that errors name the latter.
    The prompt must be non-blank; empty or identical answers are left to `_dataset` (dropped) or to
    `_refuse_without_preference` (refused).
    """
    sources = sources or {}

    def name(key: str) -> str:
        return sources.get(key, key)

    prompt, chosen, rejected = (_field(record, key, file, row) for key in ("prompt", "chosen", "rejected"))
    if isinstance(prompt, list):
        record["prompt"] = _messages(prompt, file, row, name("prompt"))
        for key, answer in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(answer, list):
                raise DataError(file, row, name(key), "the prompt is a message list, so the answer must be too")
            record[key] = _messages(answer, file, row, name(key))
            if record[key][-1]["role"] != "assistant":
                raise DataError(file, row, name(key), "the answer must end with an assistant message")
    else:
        _text(prompt, file, row, name("prompt"))
        for key, answer in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(answer, str):
                kind = type(answer).__name__
                raise DataError(file, row, name(key), f"the prompt is text, so the answer must be text, got {kind}")
    _check_margins(record, file, row, name)
    return record


def _check_margins(record: Record, file: PathLike, row: int, name: Callable[[str], str]) -> None:
    present = [key for key in MARGIN_FIELDS if key in record]
    if not present:
        return
    if len(present) == 1:
        other = "rejected_margins" if present[0] == "chosen_margins" else "chosen_margins"
        raise DataError(file, row, name(other), f"missing column ({name(present[0])} is given)")
    for key in present:
        values = record[key]
        if not isinstance(values, list):
            raise DataError(file, row, name(key), f"expected a list of numbers, got {type(values).__name__}")
        record[key] = [_number(value, file, row, f"{name(key)}[{index}]") for index, value in enumerate(values)]
    if len(record["chosen_margins"]) != len(record["rejected_margins"]):
        raise DataError(file, row, name("rejected_margins"), "must have as many values as chosen_margins")


def _refuse_without_preference(record: Record, file: PathLike, row: int, sources: Mapping[str, str]) -> None:
    problem = missing_preference(record)
    if problem is not None:
        field, reason = problem
        raise DataError(file, row, sources.get(field, field), f"{reason}: {NO_PREFERENCE}")


def _dataset(numbered: list[tuple[int, Record]], file: PathLike) -> Dataset:
    """The (source row, record) pairs as a Dataset with a `source_row` column, less the pairs that carry no
    preference (see the module docstring), which are dropped with one warning."""
    kept, dropped = [], {}
    for row, record in numbered:
        problem = missing_preference(record)
        if problem is None:
            kept.append({**record, "source_row": row})
        else:
            dropped.setdefault(problem, []).append(row)
    if dropped:
        details = "; ".join(f"{field!r} {reason}: {len(rows)} ({_some_rows(rows)})"
                            for (field, reason), rows in dropped.items())
        count = sum(len(rows) for rows in dropped.values())
        logger.warning("%s: dropped %d of %d pairs that carry no preference: %s", file, count, len(numbered), details)
    if not kept:
        raise DataError(file, None, None, "no preference pairs in file")
    return Dataset.from_list(kept)


def _some_rows(rows: list[int]) -> str:
    named = ", ".join(map(str, rows[:ROWS_NAMED_IN_WARNINGS]))
    more = f" and {len(rows) - ROWS_NAMED_IN_WARNINGS} more" if len(rows) > ROWS_NAMED_IN_WARNINGS else ""
    return f"row{'s' if len(rows) > 1 else ''} {named}{more}"


def _warn_skipped(count: int, file: PathLike, why: str) -> None:
    if count:
        logger.warning("%s: skipped %d %s", file, count, why)


# ------------------------------------------------------------------------------------ PKU-SafeRLHF

PKU_OBJECTIVES = ("better", "safer")


def load_pku_saferlhf(path: PathLike, objective: str = "better") -> Dataset:
    """PKU-SafeRLHF (PKU-Alignment): two responses per prompt, labelled for helpfulness and for harmlessness.

    Source rows: `prompt`, `response_0`, `response_1`, `better_response_id`, `safer_response_id`,
    `is_response_0_safe`, `is_response_1_safe`. Mapping: chosen = `response_{<objective>_response_id}`,
    rejected = the other response. Both labels are kept over the same pair: `better_is_chosen` and
    `safer_is_chosen` (one of them always True; the other says whether the objectives agree), and
    `is_chosen_safe` / `is_rejected_safe`.
    """
    if objective not in PKU_OBJECTIVES:
        raise ConfigError(f"load_pku_saferlhf: objective must be one of {PKU_OBJECTIVES}, got {objective!r}")
    records = []
    for row, raw in _read_numbered(path):
        ids = {name: _response_id(raw, f"{name}_response_id", path, row) for name in PKU_OBJECTIVES}
        chosen = ids[objective]
        rejected = 1 - chosen
        safe = {i: _boolean(raw, f"is_response_{i}_safe", path, row) for i in (0, 1)}
        record = {
            "prompt": _field(raw, "prompt", path, row),
            "chosen": _field(raw, f"response_{chosen}", path, row),
            "rejected": _field(raw, f"response_{rejected}", path, row),
            "better_is_chosen": ids["better"] == chosen,
            "safer_is_chosen": ids["safer"] == chosen,
            "is_chosen_safe": safe[chosen],
            "is_rejected_safe": safe[rejected],
        }
        records.append((row, _check_record(record, path, row)))
    return _dataset(records, path)


def _response_id(raw: Record, field: str, file: PathLike, row: int) -> int:
    value = _field(raw, field, file, row)
    if isinstance(value, bool) or value not in (0, 1):
        raise DataError(file, row, field, f"expected 0 or 1, got {value!r}")
    return int(value)


def _boolean(raw: Record, field: str, file: PathLike, row: int) -> bool:
    value = _field(raw, field, file, row)
    if not isinstance(value, bool):
        raise DataError(file, row, field, f"expected true or false, got {value!r}")
    return value


# --------------------------------------------------------------------------------------- HH-RLHF

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_TURN = re.compile(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})")


def load_hh_rlhf(path: PathLike, as_messages: bool = False) -> Dataset:
    """Anthropic HH-RLHF: `chosen` and `rejected` are whole dialogues ("\\n\\nHuman: ... \\n\\nAssistant: ...").

    Mapping: prompt = their shared prefix up to and including its last "\\n\\nAssistant:"; chosen /
    rejected = what follows it (text keeps its leading space, e.g. " Sure, ..."). Answers that run on into
    further turns are kept as they are; the few pairs with an empty answer (" ") are dropped (logged).
    With `as_messages=True` the prompt is split into user/assistant messages and each answer becomes
    one stripped assistant message.
    """
    records = []
    for row, raw in _read_numbered(path):
        chosen_dialogue = _text(_field(raw, "chosen", path, row), path, row, "chosen")
        rejected_dialogue = _text(_field(raw, "rejected", path, row), path, row, "rejected")
        shared = os.path.commonprefix([chosen_dialogue, rejected_dialogue])
        cut = shared.rfind(ASSISTANT)
        if cut < 0:
            raise DataError(path, row, "chosen", "chosen and rejected share no '\\n\\nAssistant:' turn")
        cut += len(ASSISTANT)
        prompt, chosen, rejected = chosen_dialogue[:cut], chosen_dialogue[cut:], rejected_dialogue[cut:]
        if as_messages:
            record = {
                "prompt": _hh_turns(prompt[: -len(ASSISTANT)], path, row),
                "chosen": [{"role": "assistant", "content": chosen.strip()}],
                "rejected": [{"role": "assistant", "content": rejected.strip()}],
            }
        else:
            record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        records.append((row, _check_record(record, path, row)))
    return _dataset(records, path)


def _hh_turns(dialogue: str, file: PathLike, row: int) -> list[Message]:
    """Split "\\n\\nHuman: a\\n\\nAssistant: b ..." into user / assistant messages."""
    parts = _HH_TURN.split(dialogue)  # ["", "\\n\\nHuman:", " a", "\\n\\nAssistant:", " b", ...]
    if parts[0].strip():
        raise DataError(file, row, "chosen", "the dialogue does not start with '\\n\\nHuman:'")
    return [
        {"role": "user" if marker == HUMAN else "assistant", "content": text.strip()}
        for marker, text in zip(parts[1::2], parts[2::2])
    ]


# ---------------------------------------------------------------------------------- UltraFeedback


def load_ultrafeedback(path: PathLike) -> Dataset:
    """UltraFeedback binarized (HuggingFaceH4 / trl-lib): one chosen and one rejected answer per prompt.

    Source rows: `prompt`, `chosen`, `rejected`, and the GPT-4 ratings `metadata.score_chosen` /
    `metadata.score_rejected` (or top-level `score_chosen` / `score_rejected`). Mapping: text is kept
    as is; the ratings become columns `score_chosen` / `score_rejected` (ties are kept). When chosen /
    rejected are whole conversations (message lists), the prompt becomes the messages before the last
    assistant message, which must be the same in both. The few pairs in the source with an empty answer
    or with chosen identical to rejected are dropped (logged).
    """
    records = []
    for row, raw in _read_numbered(path):
        prompt = _field(raw, "prompt", path, row)
        chosen, rejected = _field(raw, "chosen", path, row), _field(raw, "rejected", path, row)
        if isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen, rejected = _split_conversations(prompt, chosen, rejected, path, row)
        record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        for key in ("score_chosen", "score_rejected"):
            field = key if _lookup(raw, key) is not _MISSING else f"metadata.{key}"
            record[key] = _number(_field(raw, field, path, row), path, row, field)
        records.append((row, _check_record(record, path, row)))
    return _dataset(records, path)


def _split_conversations(
    prompt: Any, chosen: list[Any], rejected: list[Any], file: PathLike, row: int
) -> tuple[list[Message], list[Message], list[Message]]:
    """Whole conversations -> (shared conversation before the answer, [chosen answer], [rejected answer])."""
    chosen, rejected = _messages(chosen, file, row, "chosen"), _messages(rejected, file, row, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(file, row, "rejected", "the conversation before the answer differs from chosen's")
    context = chosen[:-1] or [{"role": "user", "content": _text(prompt, file, row, "prompt")}]
    return context, chosen[-1:], rejected[-1:]


# ------------------------------------------------------------------------------------ QA-Feedback

QA_FEEDBACK_PAIRS = ((1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4))
FACTUAL_ERRORS = frozenset({"Wrong-Grounding", "Unverifiable"})  # "inconsistent fact" / unverifiable
RELEVANCE_ERRORS = frozenset({"Irrelevant", "Redundant", "Incoherent"})
QA_OBJECTIVES = ("preference", "relevance", "factuality", "completeness")


def load_qa_feedback(path: PathLike, objective: str = "preference") -> Dataset:
    """QA-Feedback (allenai/FineGrainedRLHF, `tasks/qa_feedback/data/*_feedback.json`), long-form QA on ASQA.

    Source rows: `question`, `passages` ([title, sentence, ...] lists), `prediction 1`..`prediction 4`,
    `preference` and `feedback`. The prompt holds the question and the numbered passages.

    - "preference": one pair per `preference` label over (1,2), (1,3), (1,4), (2,3), (2,4), (3,4), where
      1 = the first of the pair is preferred, 2 = the second, 0 = no preference (skipped, logged).
      Columns `chosen_id` / `rejected_id` give the prediction numbers (1-4).
    - "relevance" / "factuality" / "completeness": the fine-grained `feedback` annotates `prediction 1`
      only, and `corrected-prediction` is its human edit that fixes every labelled problem. So the pair is
      chosen = the correction, rejected = `prediction 1`, for each row where prediction 1 has at least one
      problem of that kind: relevance errors (Irrelevant, Redundant, Incoherent), factual errors
      (Wrong-Grounding, Unverifiable) or `missing-info` entries. Rows without such a problem, or with an
      empty correction, are skipped (logged). Columns `chosen_error_count` (0) and `rejected_error_count`
      count those problems, for use as rule-based margins.
    """
    if objective not in QA_OBJECTIVES:
        raise ConfigError(f"load_qa_feedback: objective must be one of {QA_OBJECTIVES}, got {objective!r}")
    records: list[tuple[int, Record]] = []
    skipped = 0
    for row, raw in _read_numbered(path):
        prompt = _qa_prompt(raw, path, row)
        if objective == "preference":
            pairs = _qa_preference_pairs(raw, path, row)
            skipped += len(QA_FEEDBACK_PAIRS) - len(pairs)
        else:
            pairs = _qa_feedback_pair(raw, objective, path, row)
            skipped += not pairs
        records.extend((row, _check_record({"prompt": prompt, **pair}, path, row)) for pair in pairs)
    reason = (
        "pairs labelled 0 (no preference)"
        if objective == "preference"
        else f"rows where prediction 1 has no {objective} problem or the correction is empty"
    )
    _warn_skipped(skipped, path, reason)
    return _dataset(records, path)


def _qa_prompt(raw: Record, file: PathLike, row: int) -> str:
    question = _text(_field(raw, "question", file, row), file, row, "question").strip()
    passages = _field(raw, "passages", file, row)
    if not isinstance(passages, list) or not all(
        isinstance(p, list) and p and all(isinstance(s, str) for s in p) for p in passages
    ):
        raise DataError(file, row, "passages", "expected a list of [title, sentence, ...] lists of strings")
    blocks = [
        f"[{number}] {title.strip()}: {' '.join(' '.join(sentences).split())}"
        for number, (title, *sentences) in enumerate(passages, start=1)
    ]
    return f"Question: {question}\n\nPassages:\n" + ("\n".join(blocks) or "(none)") + "\n\nAnswer:\n"


def _qa_prediction(raw: Record, number: int, file: PathLike, row: int) -> str:
    field = f"prediction {number}"
    return _text(_field(raw, field, file, row), file, row, field).strip()


def _qa_preference_pairs(raw: Record, file: PathLike, row: int) -> list[Record]:
    labels = _field(raw, "preference", file, row)
    if not isinstance(labels, list) or len(labels) != len(QA_FEEDBACK_PAIRS) or any(
        isinstance(label, bool) or label not in (0, 1, 2) for label in labels
    ):
        raise DataError(file, row, "preference", f"expected 6 labels, each 0, 1 or 2; got {labels!r}")
    pairs = []
    for (first, second), label in zip(QA_FEEDBACK_PAIRS, labels):
        if label == 0:
            continue
        chosen, rejected = (first, second) if label == 1 else (second, first)
        pairs.append({
            "chosen": _qa_prediction(raw, chosen, file, row),
            "rejected": _qa_prediction(raw, rejected, file, row),
            "chosen_id": chosen,
            "rejected_id": rejected,
        })
    return pairs


def _qa_feedback_pair(raw: Record, objective: str, file: PathLike, row: int) -> list[Record]:
    """[] or [the (correction, prediction 1) pair] for a fine-grained objective."""
    field = "feedback.missing-info" if objective == "completeness" else "feedback.errors"
    problems = _field(raw, field, file, row)
    if not isinstance(problems, list) or not all(isinstance(problem, Mapping) for problem in problems):
        raise DataError(file, row, field, "expected a list of objects")
    if objective != "completeness":
        kinds = FACTUAL_ERRORS if objective == "factuality" else RELEVANCE_ERRORS
        problems = [error for error in problems if error.get("error type") in kinds]
    corrected = _field(raw, "feedback.corrected-prediction", file, row)
    if not isinstance(corrected, str):
        raise DataError(file, row, "feedback.corrected-prediction", "expected a string")
    if not problems or not corrected.strip():
        return []
    return [{
        "chosen": corrected.strip(),
        "rejected": _qa_prediction(raw, 1, file, row),
        "chosen_error_count": 0,
        "rejected_error_count": len(problems),
    }]


# ------------------------------------------------------------------------- attribute ratings


class _Rated(NamedTuple):
    row: int
    response: str
    ratings: list[float]


def load_attribute_ratings(
    path: PathLike,
    attributes: Sequence[str],
    prompt_field: str = "prompt",
    response_field: str = "response",
) -> Dataset:
    """HelpSteer / HelpSteer2 style: one row per (prompt, response) with a numeric rating per attribute.

    Mapping: rows are grouped by prompt (in order of first appearance); every two responses to the same
    prompt form a pair, chosen = the higher rating on `attributes[0]` (ties are skipped and logged).
    Columns `score_chosen` / `score_rejected` hold that rating; the ratings on `attributes[1:]`, in that
    order, become `chosen_margins` / `rejected_margins`. A pair's `source_row` is its chosen response's row.
    """
    if isinstance(attributes, str) or not attributes:
        raise ConfigError("load_attribute_ratings: attributes must be a non-empty list of column names")
    groups: dict[str, list[_Rated]] = {}
    for row, raw in _read_numbered(path):
        prompt = _text(_field(raw, prompt_field, path, row), path, row, prompt_field)
        response = _text(_field(raw, response_field, path, row), path, row, response_field)
        ratings = [_number(_field(raw, name, path, row), path, row, name) for name in attributes]
        groups.setdefault(prompt, []).append(_Rated(row, response, ratings))
    records, ties = [], 0
    for prompt, answers in groups.items():
        for first, second in itertools.combinations(answers, 2):
            if first.ratings[0] == second.ratings[0]:
                ties += 1
                continue
            better, worse = (first, second) if first.ratings[0] > second.ratings[0] else (second, first)
            record = {"prompt": prompt, "chosen": better.response, "rejected": worse.response,
                      "score_chosen": better.ratings[0], "score_rejected": worse.ratings[0]}
            if len(attributes) > 1:
                record |= {"chosen_margins": better.ratings[1:], "rejected_margins": worse.ratings[1:]}
            records.append((better.row, _check_record(record, path, better.row)))
    _warn_skipped(ties, path, f"pairs tied on {attributes[0]!r}")
    return _dataset(records, path)


# ---------------------------------------------------------------------------- generic preferences


def load_preferences(path: PathLike, columns: Mapping[str, str | Sequence[str]] | None = None) -> Dataset:
    """Any JSONL / JSON / parquet preference file, with an optional column mapping.

    `columns` maps a record field to a source column (dotted paths reach into nested objects), e.g.
    {"prompt": "question", "chosen": "answer_good", "rejected": "answer_bad",
     "chosen_margins": ["s1_good"], "rejected_margins": ["s1_bad"]}.
    prompt / chosen / rejected default to columns of the same name. A margin maps to one column holding
    a list of numbers, or to a list of columns holding one number each. Any other key adds an extra
    column that must hold a finite number or a boolean. Every mapped column must be in every row.

    Without `columns` the layout comes from all rows, not the first: `chosen_margins` / `rejected_margins`
    are read when any row has them, and then every row must have them. Any other top-level column whose
    values are all numbers (finite) or all booleans is kept, so that it can serve as a margin or for
    analysis; a row that lacks it gets None there.

    Text must be non-empty; margins finite numbers. This is the user's own file, so a pair with an empty
    answer or with chosen identical to rejected is refused (a `DataError` naming it), not dropped.
    """
    rows = _read_numbered(path)
    extras: list[str] = []
    if columns is None:
        mapping: dict[str, Any] = {key: key for key in STANDARD_FIELDS}
        if any(key in raw for _, raw in rows for key in MARGIN_FIELDS):
            mapping.update({key: key for key in MARGIN_FIELDS})
        extras = _number_columns(rows, taken=mapping)
    elif isinstance(columns, Mapping):
        mapping = dict(columns)
    else:
        raise ConfigError(f"load_preferences: columns must be a mapping, got {type(columns).__name__}")
    for key in STANDARD_FIELDS:
        mapping.setdefault(key, key)
    if sum(key in mapping for key in MARGIN_FIELDS) == 1:
        raise ConfigError("load_preferences: give both chosen_margins and rejected_margins, or neither")
    for key, source in mapping.items():
        if not isinstance(source, str) and not (
            key in MARGIN_FIELDS and isinstance(source, Sequence) and all(isinstance(s, str) for s in source)
        ):
            raise ConfigError(f"load_preferences: columns[{key!r}] must be a column name, got {source!r}")
    sources = {key: source for key, source in mapping.items() if isinstance(source, str)}
    records = []
    for row, raw in rows:
        record = _check_record(_mapped_record(raw, mapping, extras, path, row), path, row, sources)
        _refuse_without_preference(record, path, row, sources)
        records.append((row, record))
    return _dataset(records, path)


def _number_columns(rows: list[tuple[int, Record]], taken: Mapping[str, Any]) -> list[str]:
    """Top-level columns, other than `taken`, whose values (where present and not null) are all numbers or
    all booleans, in order of first appearance."""
    kinds: dict[str, set[type]] = {}
    for _, raw in rows:
        for key, value in raw.items():
            if key not in taken and key != "source_row" and value is not None:
                kind = bool if isinstance(value, bool) else float if isinstance(value, (int, float)) else object
                kinds.setdefault(key, set()).add(kind)
    return [key for key, found in kinds.items() if found in ({bool}, {float})]


def _mapped_record(
    raw: Record, mapping: Mapping[str, Any], optional: Sequence[str], file: PathLike, row: int
) -> Record:
    """The record of `mapping`'s columns (each required) and of the `optional` number columns (None if absent)."""
    record: Record = {}
    for key, source in mapping.items():
        if key in MARGIN_FIELDS and not isinstance(source, str):
            record[key] = [_number(_field(raw, column, file, row), file, row, column) for column in source]
            continue
        value = _field(raw, source, file, row)
        if key in STANDARD_FIELDS or key in MARGIN_FIELDS:
            record[key] = value  # checked by _check_record
        else:
            record[key] = _number_or_boolean(value, file, row, source)
    for column in optional:
        value = raw.get(column)
        record[column] = None if value is None else _number_or_boolean(value, file, row, column)
    return record


def _number_or_boolean(value: Any, file: PathLike, row: int, field: str) -> float | bool:
    return value if isinstance(value, bool) else _number(value, file, row, field)


# ------------------------------------------------------------------------------ registry, config

LOADERS: dict[str, Callable[..., Dataset]] = {
    "pku_saferlhf": load_pku_saferlhf,
    "hh_rlhf": load_hh_rlhf,
    "ultrafeedback": load_ultrafeedback,
    "qa_feedback": load_qa_feedback,
    "attribute_ratings": load_attribute_ratings,
    "jsonl": load_preferences,
}


def load_dataset_from_config(spec: Mapping[str, Any]) -> Dataset:
    """Load a data set from a config entry: {"loader": name, "path": ..., other loader kwargs}.

    Optional keys: "split": {"test_fraction": 0.2, "seed": 0, "part": "train" | "test"} (see
    `split_by_prompt`), then "limit": N keeps the first N records of the result. Records keep their
    `source_row` through both.
    """
    options = dict(spec)
    name, path = options.pop("loader", None), options.pop("path", None)
    split, limit = options.pop("split", None), options.pop("limit", None)
    if name not in LOADERS:
        raise ConfigError(f"data.loader: unknown loader {name!r}; expected one of {sorted(LOADERS)}")
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"data.path: expected a file path for loader {name!r}, got {path!r}")
    loader = LOADERS[name]
    try:
        inspect.signature(loader).bind(path, **options)
    except TypeError as error:
        raise ConfigError(f"data: bad options for loader {name!r}: {error}") from None
    dataset = loader(path, **options)
    if split is not None:
        if not isinstance(split, Mapping):
            raise ConfigError(f"data.split: expected a mapping, got {split!r}")
        try:
            inspect.signature(split_by_prompt).bind(dataset, **split)
        except TypeError as error:
            raise ConfigError(f"data.split: {error}") from None
        dataset = split_by_prompt(dataset, **split)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"data.limit: expected a non-negative integer, got {limit!r}")
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def split_by_prompt(dataset: Dataset, test_fraction: float, seed: int = 0, part: str = "train") -> Dataset:
    """The train or test part of a deterministic split that keeps all pairs of a prompt on one side.

    Distinct prompts are ranked by sha256(seed, prompt); the first round(test_fraction * n) of them (at
    least one) form the test part. The result depends only on the prompts and the seed, not on the
    row order, and keeps the original order of the records.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ConfigError(f"data.split.test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    if part not in ("train", "test"):
        raise ConfigError(f"data.split.part: expected 'train' or 'test', got {part!r}")
    keys = [json.dumps(prompt, sort_keys=True) for prompt in dataset["prompt"]]

    def rank(key: str) -> str:
        return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()

    distinct = sorted(set(keys), key=rank)
    test = set(distinct[: max(1, round(test_fraction * len(distinct)))])
    return dataset.select([i for i, key in enumerate(keys) if (key in test) == (part == "test")])
