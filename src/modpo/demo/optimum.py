"""The exact optimum of the demo task: the best any MODPO run on it can reach, for any weights and beta.

MODPO at weights w (w_0 > 0) with margins m_{1:} is optimal at

    beta * log(pi / pi_ref)(y|x) = w_0 r_0(x, y) + w_{1:} . m(x, y) + c(x),

where r_0 is the reward the preference labels carry in Bradley-Terry (DPO) scale. The demo's labels are
Bradley-Terry at temperature T on the exact reward, so r_0 = r_helpful / T; a margin model that reached its own
DPO optimum gives m = r_harmless / T as well. The optimum is therefore the tilted reference

    pi_w(y|x) = pi_ref(y|x) exp(w . r(x, y) / (beta T)) / Z(x),

with the exact rewards r of `modpo.demo.task`. It is computed here by enumerating every well-formed response
(NUM_WORDS ** RESPONSE_LENGTH per topic) under the actual reference model (its log-probabilities, not an
idealised uniform base). What the reference puts on malformed responses (other tokens) is kept as one lump that
scores 0 on every objective, as the evaluator scores it; in the tilt it weighs exp(0).

The point of w is the expected exact reward of every objective under pi_w, averaged over the topics of the
evaluation prompts in their proportions, as the front's sampled evaluation averages them.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import torch

from modpo.data.encode import encode_prompt
from modpo.demo import task
from modpo.logps import batched_sequence_logps
from modpo.models import load_model, load_tokenizer


def all_responses() -> list[tuple[int, ...]]:
    """Every well-formed response as word indices, in a fixed order (NUM_WORDS ** RESPONSE_LENGTH of them)."""
    return list(itertools.product(range(task.NUM_WORDS), repeat=task.RESPONSE_LENGTH))


def reward_table() -> torch.Tensor:
    """Exact rewards of every response under every topic: (NUM_TOPICS, responses, objectives), float64."""
    responses = torch.tensor(all_responses())  # (R, L)
    per_word = torch.tensor([[task.word_rewards(topic, word) for word in task.WORDS] for topic in task.TOPICS],
                            dtype=torch.float64)  # (topics, words, objectives)
    return torch.stack([per_word[t][responses].mean(dim=1) for t in range(task.NUM_TOPICS)])


def reference_logps(model, tokenizer, batch_size: int = 2048, bar_eos: bool = True) -> torch.Tensor:
    """log pi(y | topic) of every response under every topic: (NUM_TOPICS, responses), float64.

    The prompt ids are those sampling gives the model (`encode_prompt`); a response is its word ids, no eos
    (the demo trains and samples exactly RESPONSE_LENGTH words). With `bar_eos`, as the front samples them
    (min_new_tokens = RESPONSE_LENGTH): eos is barred at every step, so each step's distribution is renormalised
    over the other tokens, log pi(y) - sum_t log(1 - pi(eos | x, y_<t)).
    """
    word_ids = tokenizer.convert_tokens_to_ids(task.WORDS)
    responses = [[word_ids[i] for i in r] for r in all_responses()]
    prompts = [encode_prompt(topic, tokenizer) for topic in task.TOPICS]
    logps = batched_sequence_logps(model, [p for p in prompts for _ in responses], responses * len(prompts),
                                   tokenizer.pad_token_id, batch_size=batch_size, desc="optimum log-probs")
    logps = logps.double().reshape(len(prompts), len(responses))
    if not bar_eos or tokenizer.eos_token_id is None:
        return logps
    return logps - _no_eos_logps(model, tokenizer, prompts, word_ids, batch_size)


def _no_eos_logps(model, tokenizer, prompts, word_ids, batch_size) -> torch.Tensor:
    """sum_t log(1 - pi(eos | x, y_<t)) of every response: (topics, responses), float64."""
    eos = tokenizer.eos_token_id
    prefixes = [p for n in range(task.RESPONSE_LENGTH) for p in itertools.product(range(task.NUM_WORDS), repeat=n)]
    index = {p: i for i, p in enumerate(prefixes)}
    ids = [[word_ids[i] for i in p] for p in prefixes]
    rows_p = [p for p in prompts for _ in ids]
    with_eos = batched_sequence_logps(model, rows_p, [r + [eos] for r in ids] * len(prompts), tokenizer.pad_token_id,
                                      batch_size=batch_size, desc="optimum eos log-probs").double()
    nonempty = [i for i, r in enumerate(ids * len(prompts)) if r]
    prefix_logps = torch.zeros(len(rows_p), dtype=torch.float64)
    prefix_logps[nonempty] = batched_sequence_logps(model, [rows_p[i] for i in nonempty],
                                                    [(ids * len(prompts))[i] for i in nonempty],
                                                    tokenizer.pad_token_id, batch_size=batch_size,
                                                    desc="optimum prefix log-probs").double()
    stay = torch.log1p(-(with_eos - prefix_logps).exp()).reshape(len(prompts), len(prefixes))  # log(1 - p_eos)
    steps = torch.tensor([[index[r[:t]] for t in range(task.RESPONSE_LENGTH)] for r in all_responses()])
    return stay[:, steps].sum(dim=2)


def tilted_expectation(logps: torch.Tensor, rewards: torch.Tensor, weights, scale: float,
                       topic_weights: torch.Tensor) -> torch.Tensor:
    """Expected rewards (objectives,) under pi_ref * exp(scale * w . r), per topic, averaged with `topic_weights`.

    logps (topics, R): log pi_ref of the well-formed responses; the rest of each topic's mass (1 - sum exp) is
    one malformed lump with reward 0. rewards (topics, R, K); scale = 1 / (beta T).
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    logps, rewards = logps.double(), rewards.double()
    valid_mass = torch.logsumexp(logps, dim=1).exp().clamp(max=1.0)
    lump = torch.log1p(-valid_mass).unsqueeze(1)  # -inf where the reference is all well-formed
    tilted = torch.cat([logps + scale * (rewards @ w), lump], dim=1)
    probs = torch.softmax(tilted, dim=1)[:, :-1]  # the lump scores 0: it adds nothing to the expectation
    per_topic = torch.einsum("tr,trk->tk", probs, rewards)
    return (topic_weights.double() / topic_weights.sum()) @ per_topic


def topic_weights(prompts: list[str]) -> torch.Tensor:
    """How often each topic occurs among the evaluation prompts, as a weight per topic."""
    counts = Counter(p.strip() for p in prompts)
    unknown = set(counts) - set(task.TOPICS)
    if unknown:
        raise ValueError(f"evaluation prompts that are no topic of the demo task: {sorted(unknown)}")
    return torch.tensor([counts[t] for t in task.TOPICS], dtype=torch.float64)


@dataclass
class ExactOptimum:
    """The demo's optimal point for any weights: call it with a weight vector, get one value per objective."""

    logps: torch.Tensor  # (topics, R) reference log-probs
    rewards: torch.Tensor  # (topics, R, K) exact rewards
    topic_weights: torch.Tensor  # (topics,)
    beta: float
    temperature: float

    def __call__(self, weights) -> list[float]:
        if len(weights) != len(task.OBJECTIVES):
            raise ValueError(f"weights {weights}: one per objective {task.OBJECTIVES}")
        scale = 1.0 / (self.beta * self.temperature)
        return tilted_expectation(self.logps, self.rewards, weights, scale, self.topic_weights).tolist()

    def reference_point(self) -> list[float]:
        """The reference model's own expected rewards (the tilt at w = 0)."""
        return tilted_expectation(self.logps, self.rewards, [0.0] * len(task.OBJECTIVES), 0.0,
                                  self.topic_weights).tolist()

    def describe(self) -> str:
        return (f"exact optimum pi_ref exp(w . r / (beta T)), beta {self.beta:g}, label temperature "
                f"T {self.temperature:g}, every response enumerated under the reference model")


def exact_optimum(reference_model: str, prompts: list[str], beta: float,
                  temperature: float = task.PREFERENCE_TEMPERATURE) -> ExactOptimum:
    """The optimum for a reference model folder (the demo's SFT model) and the evaluation prompts."""
    tokenizer = load_tokenizer(reference_model)
    model = load_model(reference_model)
    return ExactOptimum(reference_logps(model, tokenizer), reward_table(), topic_weights(prompts), beta, temperature)


def model_point(model, tokenizer, prompts: list[str]) -> list[float]:
    """A model's exact expected rewards on the evaluation prompts, by enumeration: what sampling estimates,
    without its noise (malformed responses scoring 0)."""
    return tilted_expectation(reference_logps(model, tokenizer), reward_table(), [0.0] * len(task.OBJECTIVES), 0.0,
                              topic_weights(prompts)).tolist()
