"""One pair encoder: the token ids of (prompt, response) that every consumer scores.

Training, the reference precompute, every margin source, reward-model scoring, the baselines and sampling
all encode through `encode`, so a response is scored on the same tokens everywhere:

* Text rows: the prompt with the tokenizer's special tokens (e.g. BOS), the response without them, then eos
  when `append_eos` (as TRL appends eos to text completions).
* Chat rows (messages): the whole conversation is rendered once with the chat template, and the response is
  the part after the prompt rendered with its generation prompt, split at their longest common prefix of
  token ids (as TRL does). So prompt ids + response ids are exactly the conversation's ids, and a response
  ends exactly where the template ends an assistant turn: no eos is added to what the template renders.
  Template text is tokenized without special tokens, since the template writes them itself (no second BOS).

Long rows are fitted to `max_length` by `fit`: responses are cut from the right; a prompt that leaves no room
(or is longer than `max_prompt_length`) is a *long prompt*, which `long_prompts` decides: `truncate` (keep its
end: the latest turns and the generation prompt), `drop` the row, or `refuse` it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

LONG_PROMPTS = ("truncate", "drop", "refuse")
ENCODER_VERSION = 2  # part of cache keys of values computed from text: a change here never reuses old entries


def is_conversational(prompt, *responses) -> bool:
    return not isinstance(prompt, str) or any(not isinstance(r, str) for r in responses)


def _messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat messages given but the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


_warned_prefix = False


def encode(prompt, responses: Sequence, tokenizer, append_eos: bool = True) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [response ids, ...]) for one prompt and the responses that share it (both sides of a pair,
    or one response). Not fitted to any length; see `fit`."""
    global _warned_prefix
    if not is_conversational(prompt, *responses):
        prompt_ids = tokenizer(prompt)["input_ids"]
        eos = tokenizer.eos_token_id
        out = []
        for response in responses:
            ids = tokenizer(response, add_special_tokens=False)["input_ids"]
            if append_eos and eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            out.append(ids)
        return prompt_ids, out
    context = _messages(prompt, "user")
    prompt_ids = _template(tokenizer, context, add_generation_prompt=True)
    conversations = [_template(tokenizer, context + _messages(r, "assistant"), add_generation_prompt=False)
                     for r in responses]
    shared = min([len(prompt_ids)] + [_common_prefix(prompt_ids, ids) for ids in conversations])
    if shared < len(prompt_ids) and not _warned_prefix:
        _warned_prefix = True
        logger.warning("the chat template renders the prompt with its generation prompt differently from the "
                       "start of the whole conversation; responses start where they diverge (%r is left out)",
                       tokenizer.decode(prompt_ids[shared:]))
    return prompt_ids[:shared], [ids[shared:] for ids in conversations]


def prompt_as_encoded(prompt, chat: bool):
    """A prompt in the form `encode` gives it where the row is `chat` (`is_conversational`: a text prompt with
    chat-message responses is one user turn), so that sampling it (`encode_prompt`) templates it as training did."""
    return _messages(prompt, "user") if isinstance(prompt, str) and chat else prompt


def encode_prompt(prompt, tokenizer, chat: bool | None = None) -> list[int]:
    """The ids a model is given to answer `prompt` (for sampling): the prompt part of `encode`. A text prompt is
    rendered as one user turn when `chat` (as `encode` does for a text prompt with message responses)."""
    if isinstance(prompt, str) and not chat:
        return tokenizer(prompt)["input_ids"]
    return _template(tokenizer, _messages(prompt, "user"), add_generation_prompt=True)


@dataclass
class Fitted:
    prompt_ids: list[int]
    response_ids: list[list[int]]
    prompt_cut: bool = False
    responses_cut: int = 0


def fit(prompt_ids: list[int], response_ids: Sequence[list[int]], max_length: int, long_prompts: str = "truncate",
        max_prompt_length: int | None = None, reserved: int = 0) -> Fitted | None:
    """Fit prompt + each response into `max_length` tokens; None when a long prompt's row is dropped.

    A prompt is long when it leaves no room for a response within `max_length` or is longer than
    `max_prompt_length`. `truncate` keeps its last `max_prompt_length` tokens (default: half of `max_length`);
    `refuse` raises ValueError. Responses longer than the room left are cut from the right. `reserved` tokens of
    `max_length` are kept free for what comes before the prompt (a weight-conditioned row's prefix).
    """
    if long_prompts not in LONG_PROMPTS:
        raise ValueError(f"long_prompts = {long_prompts!r}; expected one of {LONG_PROMPTS}")
    length = max_length - reserved
    limit = min(max_prompt_length or length - 1, length - 1)
    prompt_cut = False
    if len(prompt_ids) > limit:
        if long_prompts == "drop":
            return None
        if long_prompts == "refuse":
            kept = f", {reserved} of them for the weight prefix" if reserved else ""
            raise ValueError(f"{len(prompt_ids)} tokens, over the limit of {limit} "
                             f"(max_length={max_length}{kept}{f', max_prompt_length={max_prompt_length}' if max_prompt_length else ''}); "
                             f"set long_prompts to 'truncate' or 'drop' to train on such rows")
        keep = min(max_prompt_length or max(1, length // 2), limit)
        prompt_ids, prompt_cut = list(prompt_ids[-keep:]), True
    room = length - len(prompt_ids)
    fitted = [list(ids[:room]) for ids in response_ids]
    cut = sum(len(ids) > room for ids in response_ids)
    return Fitted(list(prompt_ids), fitted, prompt_cut, cut)


def row_list(rows: Sequence) -> str:
    """The first few rows of a list for a warning line, each source row once (a loader may make several pairs
    of one row)."""
    rows = list(dict.fromkeys(rows))
    shown = ", ".join(map(str, rows[:5]))
    return shown + (f", ... ({len(rows) - 5} more)" if len(rows) > 5 else "")


@dataclass
class FitReport:
    """What `fit` did over a data set, for one warning line."""

    rows: int = 0
    responses: int = 0
    responses_cut: int = 0
    prompts_cut: list[int] = field(default_factory=list)   # row names (file line or index) as shown to the user
    dropped: list[int] = field(default_factory=list)

    def add(self, fitted: Fitted | None, row, responses: int) -> None:
        self.rows += 1
        self.responses += responses
        if fitted is None:
            self.dropped.append(row)
            return
        self.responses_cut += fitted.responses_cut
        if fitted.prompt_cut:
            self.prompts_cut.append(row)

    def warn(self, name: str, max_length: int, row_word: str = "rows") -> None:
        some = row_list
        if self.prompts_cut:
            logger.warning("%s: %d of %d prompts were too long for max_length=%d and were cut from the left, keeping "
                           "their end (%s %s)", name, len(self.prompts_cut), self.rows, max_length, row_word,
                           some(self.prompts_cut))
        if self.dropped:
            logger.warning("%s: %d of %d rows were dropped: their prompts were too long for max_length=%d (%s %s)",
                           name, len(self.dropped), self.rows, max_length, row_word, some(self.dropped))
        if self.responses_cut:
            logger.warning("%s: %d of %d responses were longer than max_length=%d and were truncated",
                           name, self.responses_cut, self.responses, max_length)


def scoring_ids(prompt, responses: Sequence, tokenizer, max_length: int, append_eos: bool = True
                ) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [response ids, ...]) for log-prob scoring of responses that share a prompt: `encode` then `fit`
    (a long prompt is cut from the left). An empty response scores one token, eos: the model stopping at once."""
    prompt_ids, encoded = encode(prompt, responses, tokenizer, append_eos)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    fitted = fit(prompt_ids, [ids or eos for ids in encoded], max_length)
    return fitted.prompt_ids, fitted.response_ids


def reward_ids(prompt, response, tokenizer) -> list[int]:
    """Prompt + response as TRL's RewardTrainer trains a reward model on it (text rows end with eos), uncut."""
    prompt_ids, (response_ids,) = encode(prompt, [response], tokenizer, append_eos=True)
    return prompt_ids + response_ids


def sequence_ids(prompt, response, tokenizer, max_length: int) -> list[int]:
    """The ids a reward model scores: `reward_ids`, keeping the last `max_length` (the score is read at the end, so a
    long input loses its start)."""
    return reward_ids(prompt, response, tokenizer)[-max_length:]
