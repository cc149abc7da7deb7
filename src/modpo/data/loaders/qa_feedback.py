"""QA-Feedback (FineGrainedRLHF): preference labels and fine-grained feedback on long-form answers."""

from __future__ import annotations

from collections.abc import Mapping

from datasets import Dataset

from modpo.data.loaders.files import _read_numbered
from modpo.data.loaders.records import PathLike, Record, _check_record, _dataset, _field, _text, _warn_skipped
from modpo.errors import ConfigError, DataError

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
