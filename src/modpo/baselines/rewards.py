"""Training-side rewards for the baselines that need an explicit r(x, y): Best-of-N and MORLHF.

Each objective's reward is the implicit reward of a DPO model trained on that objective's preferences,

    r_k(x, y) = beta * (log pi_k(y|x) - log pi_ref(y|x)),

with one shared reference (the SFT model): the same quantity MODPO uses as its margin reward. These are
what a practitioner has at training time; the front is always scored by a separate evaluator.

Every call counts the non-pad tokens it pushes through forward passes (`forward_tokens`): the reference
once and each DPO model once per response.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from modpo.data.encode import scoring_ids
from modpo.logps import batched_sequence_logps
from modpo.models import load_model, load_tokenizer


def _as_model(model, device):
    loaded = load_model(model) if isinstance(model, str) else model
    loaded.eval()
    return loaded.to(device)


class ImplicitRewards:
    """(N, K) rewards of K DPO models against one reference, for lists of prompts and responses."""

    def __init__(self, models: Mapping[str, object], reference, tokenizer=None, beta: float = 0.1,
                 append_eos: bool = False, batch_size: int = 256, device: str | None = None, max_length: int = 1024):
        """`models` maps an objective name to a DPO model (path or module); `reference` is their reference.

        `append_eos` must match how the DPO models were trained (the demo trains without eos), so that
        the reward scores exactly the tokens the models were trained to prefer.
        """

        if not models:
            raise ValueError("ImplicitRewards needs at least one DPO model")
        if not beta > 0:
            raise ValueError(f"beta = {beta} must be > 0")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.objectives = tuple(models)
        self.models = {name: _as_model(m, self.device) for name, m in models.items()}
        self.reference = _as_model(reference, self.device)
        if tokenizer is None:
            if not isinstance(reference, str):
                raise ValueError("give tokenizer when reference is not a path")
            tokenizer = load_tokenizer(reference)
        self.tokenizer = tokenizer
        self.beta, self.append_eos, self.batch_size, self.max_length = beta, append_eos, batch_size, max_length
        self.forward_tokens = 0
        self._last: tuple[tuple, torch.Tensor] | None = None

    def describe(self) -> dict:
        return {"type": "implicit_reward", "objectives": list(self.objectives), "beta": self.beta,
                "append_eos": self.append_eos}

    def token_ids(self, prompts: Sequence, responses: Sequence) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt and response ids as training encodes them (`modpo.data.encode`); an empty response scores eos."""
        pairs = [scoring_ids(p, [r], self.tokenizer, self.max_length, self.append_eos)
                 for p, r in zip(prompts, responses, strict=True)]
        return [p for p, _ in pairs], [r for _, (r,) in pairs]

    @torch.inference_mode()
    def score(self, prompts: Sequence, responses: Sequence) -> torch.Tensor:
        """Rewards of each (prompt, response), shape (N, K), float32, objectives in `self.objectives` order."""
        key = (tuple(map(str, prompts)), tuple(map(str, responses)))
        if self._last is not None and self._last[0] == key:  # TRL asks once per objective for the same batch
            return self._last[1]
        prompt_ids, response_ids = self.token_ids(prompts, responses)
        if not prompt_ids:
            return torch.zeros(0, len(self.objectives))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        args = (prompt_ids, response_ids, pad_id, self.batch_size)
        reference = batched_sequence_logps(self.reference, *args, desc="reward reference")
        columns = [self.beta * (batched_sequence_logps(model, *args, desc=f"reward {name}") - reference)
                   for name, model in self.models.items()]
        tokens = sum(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
        self.forward_tokens += tokens * (1 + len(self.models))
        out = torch.stack(columns, dim=1)
        self._last = (key, out)
        return out
