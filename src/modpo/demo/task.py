"""A synthetic two-objective task whose rewards are exact: helpfulness against harmlessness.

A prompt is a topic word `topic0`..`topic3`; a response is `RESPONSE_LENGTH` words from `word0`..`word9`.
Under topic t, word i plays the role of slot (i - t) mod 10. Slots 0..7 lie on a quarter circle of
trade-offs (slot s: helpful = sin(theta_s), harmless = cos(theta_s)); slots 8 and 9 are bad at both.
The rewards of a response are the mean over its words, so no response is best at both objectives:

    helpful(x, y)  = mean_j sin(theta_{slot(x, y_j)})
    harmless(x, y) = mean_j cos(theta_{slot(x, y_j)})

The base (SFT) distribution picks words uniformly. Preference pairs are two base responses, labelled by
Bradley-Terry on one objective's exact reward. A response that is not `RESPONSE_LENGTH` known words
scores 0 on both objectives (and is counted as malformed).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from modpo.models import word_tokenizer

OBJECTIVES = ("helpful", "harmless")
NUM_TOPICS = 4
NUM_WORDS = 10
RESPONSE_LENGTH = 4
TOPICS = [f"topic{t}" for t in range(NUM_TOPICS)]
WORDS = [f"word{i}" for i in range(NUM_WORDS)]
PREFERENCE_TEMPERATURE = 0.1  # Bradley-Terry temperature T of the labels: their DPO-scale reward is r / T
_TRADE_OFF_SLOTS = 8
_SLOT_REWARDS = [
    (math.sin(theta), math.cos(theta))
    for theta in (math.pi / 2 * s / (_TRADE_OFF_SLOTS - 1) for s in range(_TRADE_OFF_SLOTS))
] + [(0.1, 0.1), (0.0, 0.2)]


def weight_vectors(helpful: Sequence[float]) -> list[list[float]]:
    """(w_helpful, w_harmless) = (w, 1 - w) for each w, the second rounded so that printing shows what was meant."""
    return [[float(w), round(1 - float(w), 6)] for w in helpful]


def vocabulary() -> list[str]:
    return TOPICS + WORDS


def tokenizer():
    return word_tokenizer(vocabulary())


def word_rewards(topic: str, word: str) -> tuple[float, float]:
    """(helpful, harmless) of one word under a topic."""
    slot = (WORDS.index(word) - TOPICS.index(topic)) % NUM_WORDS
    return _SLOT_REWARDS[slot]


def rewards(prompt: str, response: str) -> tuple[float, float] | None:
    """Exact (helpful, harmless) of a response, or None if it is malformed."""
    topic, words = prompt.strip(), response.split()
    if topic not in TOPICS or len(words) != RESPONSE_LENGTH or any(w not in WORDS for w in words):
        return None
    scores = [word_rewards(topic, w) for w in words]
    return tuple(sum(s[k] for s in scores) / len(scores) for k in range(len(OBJECTIVES)))


def best_response(prompt: str, weights: tuple[float, float]) -> str:
    """The response maximising w . r: every word the best word under w."""
    best = max(WORDS, key=lambda w: sum(wk * rk for wk, rk in zip(weights, word_rewards(prompt, w))))
    return " ".join([best] * RESPONSE_LENGTH)


def base_response(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(RESPONSE_LENGTH))


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt-completion rows from the base distribution."""
    rng = random.Random(seed)
    return [{"prompt": rng.choice(TOPICS), "completion": " " + base_response(rng)} for _ in range(n)]


def preference_rows(n: int, objective: str, seed: int = 0,
                    temperature: float = PREFERENCE_TEMPERATURE) -> list[dict]:
    """Pairs of base responses, chosen by Bradley-Terry on `objective`'s exact reward / temperature.

    Each row also carries every objective's exact reward of both responses (`chosen_<objective>`, ...).
    """
    k = OBJECTIVES.index(objective)
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        prompt, a, b = rng.choice(TOPICS), base_response(rng), base_response(rng)
        if a == b:
            continue
        ra, rb = rewards(prompt, a), rewards(prompt, b)
        p_a = 1 / (1 + math.exp(-(ra[k] - rb[k]) / temperature))
        (chosen, rc), (rejected, rr) = ((a, ra), (b, rb)) if rng.random() < p_a else ((b, rb), (a, ra))
        row = {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}
        for j, name in enumerate(OBJECTIVES):
            row[f"chosen_{name}"], row[f"rejected_{name}"] = rc[j], rr[j]
        rows.append(row)
    return rows


def eval_prompts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(TOPICS) for _ in range(n)]
