"""Sampling responses from a model for a prompt set, batched, seeded and recorded."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from modpo.data.encode import encode_prompt
from modpo.front.divergence import response_ids
from modpo.progress import bar


@dataclass
class SamplingSettings:
    samples_per_prompt: int = 1
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 64

    def record(self) -> dict:
        return asdict(self)


def left_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompts padded on the left, so every one ends where generation starts."""
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return input_ids, attention_mask


@torch.inference_mode()
def sample_responses(model, tokenizer, prompts: list, settings: SamplingSettings, desc: str = "sampling",
                     prefix: list[int] | None = None, keep_ids: bool = False) -> list[dict]:
    """[{prompt, response}] with `samples_per_prompt` samples per prompt, in prompt order. `prefix` ids come before
    every prompt (a weight-conditioned model's condition, `modpo.conditioning`). `keep_ids`: each sample also has
    its `prompt_ids` (without the prefix) and `response_ids` (up to its first eos)."""
    device = next(model.parameters()).device
    model.eval()
    # the prompt ids training scored responses after
    prompt_ids = [encode_prompt(p, tokenizer) for p in prompts]
    encoded = [list(prefix or []) + ids for ids in prompt_ids]
    jobs = [(i, s) for i in range(len(prompts)) for s in range(settings.samples_per_prompt)]
    pad_id = tokenizer.pad_token_id
    results = []
    for start in bar(range(0, len(jobs), settings.batch_size), desc=desc, unit="batch", leave=False):
        batch = jobs[start : start + settings.batch_size]
        torch.manual_seed(settings.seed + start)  # reproducible per batch, independent of earlier batches
        input_ids, attention_mask = left_padded([encoded[i] for i, _ in batch], pad_id, device)
        width = input_ids.shape[1]
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=settings.temperature > 0,
                             temperature=settings.temperature or None, top_p=settings.top_p,
                             max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
                             pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        for (i, s), ids in zip(batch, out[:, width:]):
            response = tokenizer.decode(ids, skip_special_tokens=True)
            results.append({"prompt": prompts[i], "response": response, "sample": s})
            if keep_ids:
                results[-1].update(prompt_ids=prompt_ids[i], response_ids=response_ids(ids.tolist(), tokenizer.eos_token_id))
    return results
