"""KL(pi || pi_ref) of a sampled model, estimated from its own samples (the DPO paper's reward-against-KL view).

For responses y ~ pi(.|x), the mean of log pi(y|x) - log pi_ref(y|x) is an unbiased estimate of KL(pi || pi_ref)
averaged over the prompts, when the samples come from pi itself: temperature 1 and top_p 1. With another
temperature or nucleus the samples come from a different distribution, and the number is reported as not unbiased.
A response cut at max_new_tokens counts the tokens it has (the KL of the truncated distribution).
"""

from __future__ import annotations

import torch

from modpo.front.report import mean_and_stderr
from modpo.logps import batched_sequence_logps


def response_ids(generated: list[int], eos_id: int | None) -> list[int]:
    """A generated row up to and including its first eos (what follows is padding)."""
    if eos_id is not None and eos_id in generated:
        return generated[: generated.index(eos_id) + 1]
    return generated


def log_ratios(policy, reference, prompt_ids: list[list[int]], responses: list[list[int]], pad_id: int,
               policy_prefix: list[int] | None = None) -> torch.Tensor:
    """log pi(y|x) - log pi_ref(y|x) per sample. `policy_prefix`: ids only the policy reads before each prompt
    (a weight-conditioned model's condition); the reference reads the prompt alone."""
    prefixed = [list(policy_prefix or []) + list(p) for p in prompt_ids]
    return (batched_sequence_logps(policy, prefixed, responses, pad_id, desc="KL: policy")
            - batched_sequence_logps(reference, prompt_ids, responses, pad_id, desc="KL: reference"))


def kl_summary(values: list[float], temperature: float, top_p: float, reference: str) -> dict:
    """The KL estimate with its standard error, and whether the samples make it unbiased."""
    estimate, stderr = mean_and_stderr(values)
    return {"estimate": estimate, "stderr": stderr, "n": len(values), "reference": reference,
            "unbiased": temperature == 1 and top_p == 1}
