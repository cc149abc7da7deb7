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

Modules: `records` (the record, its checks, the Dataset), `files` (reading), one module per public data
set, `preferences` (any file) and `config` (the registry, `load_dataset_from_config`, `split_by_prompt`).
"""

from modpo.data.loaders.attribute_ratings import load_attribute_ratings
from modpo.data.loaders.config import LOADERS, load_dataset_from_config, split_by_prompt
from modpo.data.loaders.files import read_records
from modpo.data.loaders.hh_rlhf import ASSISTANT, HUMAN, load_hh_rlhf
from modpo.data.loaders.pku_saferlhf import PKU_OBJECTIVES, load_pku_saferlhf
from modpo.data.loaders.preferences import load_preferences
from modpo.data.loaders.qa_feedback import (
    FACTUAL_ERRORS,
    QA_FEEDBACK_PAIRS,
    QA_OBJECTIVES,
    RELEVANCE_ERRORS,
    load_qa_feedback,
)
from modpo.data.loaders.records import (
    MARGIN_FIELDS,
    ROLES,
    ROWS_NAMED_IN_WARNINGS,
    STANDARD_FIELDS,
    Message,
    PathLike,
    Record,
)
from modpo.data.loaders.ultrafeedback import load_ultrafeedback

__all__ = [
    "ASSISTANT",
    "FACTUAL_ERRORS",
    "HUMAN",
    "LOADERS",
    "MARGIN_FIELDS",
    "PKU_OBJECTIVES",
    "QA_FEEDBACK_PAIRS",
    "QA_OBJECTIVES",
    "RELEVANCE_ERRORS",
    "ROLES",
    "ROWS_NAMED_IN_WARNINGS",
    "STANDARD_FIELDS",
    "Message",
    "PathLike",
    "Record",
    "load_attribute_ratings",
    "load_dataset_from_config",
    "load_hh_rlhf",
    "load_pku_saferlhf",
    "load_preferences",
    "load_qa_feedback",
    "load_ultrafeedback",
    "read_records",
    "split_by_prompt",
]
