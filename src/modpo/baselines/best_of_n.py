"""Best-of-N: sample N responses from the SFT model, keep the one maximising w . r(x, y).

r are the training-side rewards (`baselines.rewards.ImplicitRewards`: the per-objective DPO models' implicit
rewards), never the evaluator. One pool of candidates serves every weight vector: each response of the
front is the best of its own group of N candidates, so a point has as many responses as the other methods'.
No training; the cost is at inference time: N samples and K + 1 scoring passes per response.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from modpo.data.encode import encode_prompt
from modpo.front.evaluators import score_samples
from modpo.front.generate import sample_responses
from modpo.front.report import summarize
from modpo.front.sweep import point_name
from modpo.models import load_model, load_tokenizer


def best_of_n_indices(rewards: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """For rewards of shape (groups, N, K), the index in 0..N-1 of each group's max of w . r (first on ties)."""
    if rewards.dim() != 3 or rewards.shape[-1] != len(weights):
        raise ValueError(f"rewards of shape {tuple(rewards.shape)}: expected (groups, N, {len(weights)})")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    return torch.argmax(rewards.to(torch.float64) @ w, dim=1)


def select_best(candidates: list[dict], rewards: torch.Tensor, n: int, weights: Sequence[float]) -> list[dict]:
    """Candidates come in consecutive groups of `n` (same prompt); returns each group's best under w . r."""
    if len(candidates) % n or len(candidates) != rewards.shape[0]:
        raise ValueError(f"{len(candidates)} candidates and {rewards.shape[0]} reward rows: need groups of n = {n}")
    best = best_of_n_indices(rewards.reshape(len(candidates) // n, n, -1), weights)
    return [candidates[g * n + int(i)] for g, i in enumerate(best)]


def sample_candidates(model, tokenizer, prompts: list, settings, n: int) -> tuple[list[dict], int]:
    """`n` candidates for each of the `settings.samples_per_prompt` responses per prompt, in groups of n.

    Returns (candidates, forward tokens of sampling: prompt plus generated tokens of every sequence; exact
    when min_new_tokens == max_new_tokens, as on the demo task, an upper bound otherwise).
    """

    pool = replace(settings, samples_per_prompt=settings.samples_per_prompt * n)
    candidates = sample_responses(model, tokenizer, prompts, pool, desc=f"best-of-{n} candidates")
    prompt_tokens = sum(len(encode_prompt(p, tokenizer)) for p in prompts)
    tokens = pool.samples_per_prompt * prompt_tokens + len(candidates) * settings.max_new_tokens
    return candidates, tokens


def run_best_of_n(sft, rewards, prompts: list, settings, n: int, weight_vectors: Sequence[Sequence[float]],
                  evaluators, name_of=None) -> tuple[list[dict], dict]:
    """Points of the Best-of-N front (scored by `evaluators`) and the compute record."""
    return run_best_of_n_sizes(sft, rewards, prompts, settings, [n], weight_vectors, evaluators, name_of)[n]


def first_of_groups(candidates: list[dict], scores: torch.Tensor, pool: int, n: int) -> tuple[list[dict], torch.Tensor]:
    """From groups of `pool` candidates, the first `n` of every group: best-of-n from a best-of-pool sample."""
    keep = [g * pool + j for g in range(len(candidates) // pool) for j in range(n)]
    return [candidates[i] for i in keep], scores[keep]


def run_best_of_n_sizes(sft, rewards, prompts: list, settings, sizes: Sequence[int],
                        weight_vectors: Sequence[Sequence[float]], evaluators, name_of=None) -> dict:
    """Best-of-N at every N in `sizes`, from one pool of max(sizes) candidates per response (best-of-n takes the
    first n of each group): {n: (points, compute)}. The compute of N = n is the pool's scaled by n / max(sizes):
    the tokens and seconds n candidates take."""

    name_of = name_of or point_name
    pool = max(sizes)
    started = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(str(sft))
    model = load_model(str(sft)).to(device) if isinstance(sft, str) else sft
    candidates, sampling_tokens = sample_candidates(model, tokenizer, prompts, settings, pool)
    sampled = time.time()
    before = rewards.forward_tokens
    scores = rewards.score([c["prompt"] for c in candidates], [c["response"] for c in candidates])
    scoring_tokens = rewards.forward_tokens - before
    scored = time.time()
    results = {}
    for n in sizes:
        group, group_scores = first_of_groups(candidates, scores, pool, n)
        points = []
        for weights in weight_vectors:
            chosen = select_best(group, group_scores, n, weights)
            columns, malformed, objectives = score_samples(evaluators, chosen)
            points.append(summarize(name_of(list(weights)), list(weights), columns, objectives, malformed,
                                    {"n_candidates": n}))
        share = n / pool
        compute = {"wall_seconds": round((scored - started) * share, 2),
                   "sampling_seconds": round((sampled - started) * share, 2),
                   "scoring_seconds": round((scored - sampled) * share, 2), "device": device,
                   "tokens": {"forward": round((sampling_tokens + scoring_tokens) * share), "backward": 0},
                   "token_detail": {"sampling_forward": round(sampling_tokens * share),
                                    "scoring_forward": round(scoring_tokens * share)},
                   "n": n, "candidates": len(group)}
        results[n] = (points, compute)
    return results
