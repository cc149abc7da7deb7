"""Anthropic HH-RLHF: pairs of whole dialogues that differ in the last answer."""

from __future__ import annotations

import os
import re

from datasets import Dataset

from modpo.data.loaders.files import _read_numbered
from modpo.data.loaders.records import Message, PathLike, _check_record, _dataset, _field, _text
from modpo.errors import DataError

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
