"""On-policy preference pairs labelled by scorers (`modpo label`, the recipe command `label`).

The DPO paper's controlled setting: sample responses from the starting model, score every one with each scorer,
pair the samples of a prompt (0-1, 2-3, ...) and label each pair by Bradley-Terry on one scorer at temperature tau:

    P(a preferred to b) = sigmoid((s(a) - s(b)) / tau),   chosen = a with that probability (seeded).

Written to `output_dir`: samples.jsonl (every response with its scores), pairs_<label>.jsonl per label (preference
rows the training stages read) and labels.json (the scorers' means, their correlations over the samples and within
pairs, and each label's agreement with its scorer's sign). A finished folder whose key matches is reused.
"""

from __future__ import annotations

import json
import math
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from modpo.cache import model_identity, stable_hash, tokenizer_fingerprint, write_atomic
from modpo.errors import ConfigError
from modpo.front.generate import SamplingSettings, sample_responses
from modpo.front.report import mean_and_stderr
from modpo.margin_specs import margin_sources
from modpo.models import load_model, load_tokenizer
from modpo.settings_check import check_margin_settings, number
from modpo.stages import load_data

RECORD = "labels.json"


@dataclass
class LabelConfig:
    """Sample responses from a model and label pairs of them by scorers."""

    model: str = field(metadata={"help": "The model to sample (the starting model of the stages that train on "
                                         "the pairs)."})
    output_dir: str = field(metadata={"help": "Folder for samples.jsonl, pairs_<label>.jsonl and labels.json."})
    prompts: typing.Any = field(metadata={"help": "Prompts: a data spec (as train_data) with a prompt column; each "
                                                  "distinct prompt is sampled once."})
    scorers: dict = field(metadata={"help": "name -> margin spec that scores a response, e.g. {sentiment: {type: "
                                            "scorer, preset: vader_sentiment}, brevity: {type: length_penalty}}."})
    labels: dict = field(metadata={"help": "name -> {temperature: tau}: writes pairs_<name>.jsonl labelled by "
                                           "Bradley-Terry on the scorer of that name at temperature tau."})
    samples_per_prompt: int = field(default=2, metadata={"help": "Responses per prompt (even; paired 0-1, 2-3, ...)."})
    sampling: dict = field(default_factory=dict, metadata={"help": "max_new_tokens, temperature, top_p, seed, "
                                                                   "batch_size (as a front's evaluation)."})
    seed: int = field(default=0, metadata={"help": "Seed of the Bradley-Terry draws."})


def check_label_config(cfg: LabelConfig, where: str) -> None:
    """Everything knowable before a model loads: counts, sampling keys, scorer specs, label names and tau."""
    if number(cfg.samples_per_prompt, f"{where}: samples_per_prompt", integer=True) < 2 or cfg.samples_per_prompt % 2:
        raise ConfigError(f"{where}: samples_per_prompt = {cfg.samples_per_prompt}: give an even number >= 2")
    unknown = set(cfg.sampling) - (set(SamplingSettings.__annotations__) - {"samples_per_prompt"})
    if unknown:
        raise ConfigError(f"{where}: sampling: unknown key(s) {', '.join(sorted(unknown))}")
    if not cfg.scorers or not all(isinstance(s, dict) for s in cfg.scorers.values()):
        raise ConfigError(f"{where}: scorers: give name -> margin spec, e.g. {{sentiment: {{type: scorer, "
                          "preset: vader_sentiment}}")
    check_margin_settings(list(cfg.scorers.values()))
    margin_sources(list(cfg.scorers.values()), None, max_length=1024)  # keys and packages; nothing is imported
    for name, label in cfg.labels.items():
        if name not in cfg.scorers:
            raise ConfigError(f"{where}: labels.{name}: no scorer of that name (scorers: {', '.join(cfg.scorers)})")
        if not isinstance(label, dict) or set(label) - {"temperature"}:
            raise ConfigError(f"{where}: labels.{name}: give {{temperature: tau}}")
        if number(label.get("temperature", 1.0), f"{where}: labels.{name}.temperature") <= 0:
            raise ConfigError(f"{where}: labels.{name}.temperature must be > 0")
    if not cfg.labels:
        raise ConfigError(f"{where}: labels: give at least one, e.g. {{sentiment: {{temperature: 0.1}}}}")


def bradley_terry(a: np.ndarray, b: np.ndarray, tau: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(P(a preferred), a preferred?) per pair: P = sigmoid((a - b) / tau), drawn with a seeded generator."""
    p = 0.5 * (1.0 + np.tanh((a - b) / (2 * tau)))  # the logistic function, without overflow
    return p, np.random.default_rng(seed).random(len(p)) < p


def correlations(x: np.ndarray, y: np.ndarray) -> dict:
    """Pearson and Spearman (Pearson of average ranks) correlation of two score columns."""
    def pearson(u, v):
        u, v = u - u.mean(), v - v.mean()
        scale = math.sqrt(float((u * u).sum() * (v * v).sum()))
        return float((u * v).sum() / scale) if scale > 0 else float("nan")

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties share their average rank
            r[v == value] = r[v == value].mean()
        return r

    return {"pearson": pearson(x, y), "spearman": pearson(ranks(x), ranks(y)), "n": int(len(x))}


def label_statistics(scores: dict[str, np.ndarray], pairs: dict[str, dict]) -> dict:
    """The scorers' means, their pairwise correlations over all samples and over within-pair differences (samples
    2i and 2i+1 form pair i), and each label's agreement with its scorer's sign on the pairs it does not tie."""
    names = list(scores)
    stats = {"scorers": {n: dict(zip(("mean", "stderr"), mean_and_stderr(scores[n].tolist()))) for n in names},
             "correlations": {}, "labels": {}}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff_a, diff_b = scores[a][0::2] - scores[a][1::2], scores[b][0::2] - scores[b][1::2]
            stats["correlations"][f"{a} vs {b}"] = {"samples": correlations(scores[a], scores[b]),
                                                   "within_pair_differences": correlations(diff_a, diff_b)}
    for name, label in pairs.items():
        diff, first = scores[name][0::2] - scores[name][1::2], label["first_preferred"]
        decided = diff != 0
        agree = float(((diff > 0) == first)[decided].mean()) if decided.any() else float("nan")
        n = int(decided.sum())
        stats["labels"][name] = {"temperature": label["temperature"], "pairs": int(len(diff)), "ties": int((~decided).sum()),
                                 "agreement_with_sign": agree,
                                 "agreement_stderr": math.sqrt(agree * (1 - agree) / n) if n else float("nan"),
                                 "mean_p_chosen": float(np.where(first, label["p"], 1 - label["p"]).mean())}
    return stats


def _key(cfg: LabelConfig, prompts: list, sources, model, tokenizer) -> str:
    """By content: the model's weights and tokenizer, the prompts, every setting and each scorer's identity."""
    return stable_hash({"model": model_identity(model), "tokenizer": tokenizer_fingerprint(tokenizer), "prompts": prompts,
                        "n": cfg.samples_per_prompt, "sampling": cfg.sampling, "seed": cfg.seed, "labels": cfg.labels,
                        "scorers": {n: s.identity() for n, s in zip(cfg.scorers, sources)}})


def _unusable(rows: list[dict]) -> dict[int, str]:
    """Pair index -> why it carries no preference (an empty response, or two identical ones): left out of the
    pairs files, as the data loaders would refuse them, and counted in labels.json."""
    out = {}
    for i, (a, b) in enumerate(zip(rows[0::2], rows[1::2])):
        if not a["response"].strip() or not b["response"].strip():
            out[i] = "empty"
        elif a["response"] == b["response"]:
            out[i] = "identical"
    return out


def _as_row(prompt, chosen: str, rejected: str) -> dict:
    """A preference row; a chat prompt gets its responses as assistant messages."""
    if isinstance(prompt, list):
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, lambda tmp: tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)))


def run_label(cfg: LabelConfig, say=print) -> Path:
    """Sample, score, pair and label (see the module); returns the output folder."""
    check_label_config(cfg, "label")
    out = Path(cfg.output_dir)
    data, _ = load_data(cfg.prompts, "prompts")
    prompts = list({json.dumps(p, sort_keys=True): p for p in data["prompt"]}.values())
    sources = margin_sources([dict(s) for s in cfg.scorers.values()], None, max_length=1024)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model).to("cuda" if torch.cuda.is_available() else "cpu")
    key = _key(cfg, prompts, sources, model, tokenizer)
    record_file = out / RECORD
    if record_file.exists() and json.loads(record_file.read_text()).get("key") == key:
        say(f"label: {out} is up to date")
        return out
    started = time.time()
    settings = SamplingSettings(samples_per_prompt=cfg.samples_per_prompt, **cfg.sampling)
    samples = sample_responses(model, tokenizer, prompts, settings, desc="sampling for labels")
    sampled = time.time()
    del model
    table = Dataset.from_list([{"prompt": s["prompt"], "response": s["response"]} for s in samples])
    scores = {name: source.score(table, "response")[:, 0].double().numpy() for name, source in zip(cfg.scorers, sources)}
    rows = [{**s, "scores": {n: float(scores[n][i]) for n in scores}} for i, s in enumerate(samples)]
    _write_jsonl(out / "samples.jsonl", rows)
    unusable = _unusable(rows)
    pairs = {}
    for index, (name, label) in enumerate(cfg.labels.items()):
        tau = float(label.get("temperature", 1.0))
        p, first = bradley_terry(scores[name][0::2], scores[name][1::2], tau, cfg.seed + index)
        pairs[name] = {"temperature": tau, "p": p, "first_preferred": first}
        _write_jsonl(out / f"pairs_{name}.jsonl", [
            {**_as_row(a["prompt"], *((a["response"], b["response"]) if f else (b["response"], a["response"]))),
             "p_chosen": float(pi if f else 1 - pi)}
            for i, (a, b, pi, f) in enumerate(zip(rows[0::2], rows[1::2], p, first)) if i not in unusable])
    stats = label_statistics(scores, pairs)
    dropped = {reason: sum(1 for r in unusable.values() if r == reason) for reason in ("empty", "identical")}
    if unusable:
        say(f"label: left out {len(unusable)} of {len(rows) // 2} pairs that carry no preference "
            f"({dropped['empty']} with an empty response, {dropped['identical']} with two identical responses)")
    document = {"key": key, "model": cfg.model, "prompts": len(prompts), "samples": len(samples),
                "sampling": settings.record(), "scorers": {n: s.describe() for n, s in zip(cfg.scorers, sources)},
                **stats, "pairs_left_out": dropped, "seconds": {"sampling": round(sampled - started, 1), "scoring": round(time.time() - sampled, 1)}}
    write_atomic(record_file, lambda tmp: tmp.write_text(json.dumps(document, indent=2)))
    for pair, c in stats["correlations"].items():
        say(f"label: {pair}: Pearson {c['samples']['pearson']:+.3f} over {c['samples']['n']} samples, "
            f"{c['within_pair_differences']['pearson']:+.3f} within pairs")
    for name, s in stats["labels"].items():
        say(f"label: {name} at tau={s['temperature']:g}: agreement with the scorer's sign "
            f"{s['agreement_with_sign']:.3f} ± {s['agreement_stderr']:.3f} ({s['ties']} ties of {s['pairs']})")
    return out
