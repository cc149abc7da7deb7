"""Decoding-time mixing (MOD, Shi et al. 2024): steer per-objective models at inference, with no training.

At each step the next token is drawn from

    p_w(. | x, y_<t)  proportional to  prod_k pi_k(. | x, y_<t) ** w_k,   i.e.  softmax(sum_k w_k log pi_k),

the pi_k being one model per objective (on the demo task: the helpful and the harmless DPO models). It is the other
way users steer without retraining; its cost is at inference: every objective's model runs for every generated
token. The models run on the whole sequence at each step (no KV cache): simple, and cheap at the demo's lengths.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from modpo.data.encode import encode_prompt
from modpo.front.evaluators import score_samples
from modpo.front.generate import SamplingSettings, left_padded
from modpo.front.report import summarize
from modpo.front.sweep import point_name
from modpo.models import load_model, load_tokenizer
from modpo.progress import bar


def mixed_log_probs(logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """log p_w of the next token from each model's logits (same shape (..., V)): log_softmax(sum_k w_k log pi_k)."""
    if len(logits) != len(weights):
        raise ValueError(f"{len(logits)} models and {len(weights)} weights")
    total = sum(float(w) * torch.log_softmax(l.float(), dim=-1) for w, l in zip(weights, logits))
    return torch.log_softmax(total, dim=-1)


def nucleus(log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The log-probs with the tokens outside the smallest set of probability >= top_p set to -inf."""
    if top_p >= 1.0:
        return log_probs
    ordered, index = torch.sort(log_probs, descending=True, dim=-1)
    before = torch.cumsum(ordered.exp(), dim=-1) - ordered.exp()  # mass of the tokens ranked above each one
    ordered = ordered.masked_fill(before >= top_p, float("-inf"))
    return torch.full_like(log_probs, float("-inf")).scatter(-1, index, ordered)


@torch.inference_mode()
def sample_mixed(models: Sequence[torch.nn.Module], weights: Sequence[float], tokenizer, prompts: list,
                 settings: SamplingSettings, desc: str = "mixed sampling") -> tuple[list[dict], int]:
    """[{prompt, response, sample}] drawn from p_w (temperature, top-p, min/max new tokens as `settings`), in prompt
    order, and the forward tokens spent (every model, every step, prompt included)."""
    device = next(models[0].parameters()).device
    for model in models:
        model.eval()
    encoded = [encode_prompt(p, tokenizer) for p in prompts]
    jobs = [(i, s) for i in range(len(prompts)) for s in range(settings.samples_per_prompt)]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    results, tokens = [], 0
    for start in bar(range(0, len(jobs), settings.batch_size), desc=desc, unit="batch", leave=False):
        batch = jobs[start : start + settings.batch_size]
        generator = torch.Generator(device="cpu").manual_seed(settings.seed + start)
        ids, mask = left_padded([encoded[i] for i, _ in batch], pad, device)
        width = ids.shape[1]
        done = torch.zeros(len(batch), dtype=torch.bool, device=device)
        for step in range(settings.max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = [m(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1] for m in models]
            tokens += len(models) * int(mask.sum())
            log_probs = mixed_log_probs(logits, weights)
            if step < settings.min_new_tokens and eos is not None:
                log_probs[:, eos] = float("-inf")
            if settings.temperature > 0:
                log_probs = nucleus(torch.log_softmax(log_probs / settings.temperature, dim=-1), settings.top_p)
                chosen = torch.multinomial(log_probs.exp().cpu(), 1, generator=generator).squeeze(1).to(device)
            else:
                chosen = log_probs.argmax(dim=-1)
            chosen = torch.where(done, torch.full_like(chosen, pad), chosen)
            ids = torch.cat([ids, chosen[:, None]], dim=1)
            mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
            if eos is not None:
                done |= chosen == eos
            if bool(done.all()):
                break
        for (i, s), row in zip(batch, ids[:, width:]):
            results.append({"prompt": prompts[i], "response": tokenizer.decode(row, skip_special_tokens=True), "sample": s})
    return results, tokens


def run_mixing(model_dirs: Sequence[str], weight_vectors: Sequence[Sequence[float]], prompts: list,
               settings: SamplingSettings, evaluators) -> tuple[list[dict], dict]:
    """Points of the mixing front (one per weight vector, scored by `evaluators`) and the compute record."""
    started = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(str(model_dirs[0]))
    models = [load_model(str(d)).to(device) for d in model_dirs]
    points, tokens = [], 0
    for weights in weight_vectors:
        samples, spent = sample_mixed(models, weights, tokenizer, prompts, settings, desc=f"mixing w = {list(weights)}")
        tokens += spent
        columns, malformed, objectives = score_samples(evaluators, samples)
        points.append(summarize(point_name(list(weights)), list(weights), columns, objectives, malformed, {}))
    compute = {"wall_seconds": round(time.time() - started, 2), "device": device,
               "tokens": {"forward": tokens, "backward": 0}, "token_detail": {"sampling_forward": tokens}}
    return points, compute
