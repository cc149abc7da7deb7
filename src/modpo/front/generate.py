"""Sampling responses from a model for a prompt set, batched, seeded and recorded."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from modpo.data.formats import render


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


@torch.inference_mode()
def sample_responses(model, tokenizer, prompts: list, settings: SamplingSettings, desc: str = "sampling") -> list[dict]:
    """[{prompt, response}] with `samples_per_prompt` samples per prompt, in prompt order."""
    device = next(model.parameters()).device
    model.eval()
    texts = [render(p, "", tokenizer)[0] if not isinstance(p, str) else p for p in prompts]
    conversational = [not isinstance(p, str) for p in prompts]
    jobs = [(i, s) for i in range(len(prompts)) for s in range(settings.samples_per_prompt)]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    results = []
    try:
        for start in tqdm(range(0, len(jobs), settings.batch_size), desc=desc, unit="batch", leave=False):
            batch = jobs[start : start + settings.batch_size]
            torch.manual_seed(settings.seed + start)  # reproducible per batch, independent of earlier batches
            enc = tokenizer([texts[i] for i, _ in batch], return_tensors="pt", padding=True,
                            add_special_tokens=not conversational[batch[0][0]]).to(device)
            out = model.generate(**enc, do_sample=settings.temperature > 0, temperature=settings.temperature or None,
                                 top_p=settings.top_p, max_new_tokens=settings.max_new_tokens,
                                 min_new_tokens=settings.min_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for (i, s), ids in zip(batch, out[:, enc["input_ids"].shape[1]:]):
                response = tokenizer.decode(ids, skip_special_tokens=True)
                results.append({"prompt": prompts[i], "response": response, "sample": s})
    finally:
        tokenizer.padding_side = side
    return results
