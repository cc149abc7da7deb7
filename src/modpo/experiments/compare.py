"""`modpo compare`: MODPO against its baselines on the synthetic demo task, in one harness.

Every method gets the same SFT model, the same preference data, the same weight vectors
w = (w_helpful, 1 - w_helpful) and the same evaluation (the demo front's prompts, sampling settings and
exact evaluator), and its compute is recorded (wall seconds, device, non-pad tokens through forward and
backward passes):

* modpo   the demo pipeline's front (`modpo.demo.pipeline.run_demo`): MODPO on helpful pairs with the
          harmless DPO model's implicit reward as margin.
* soups   DPO soups: theta = w * theta_helpfulDPO + (1 - w) * theta_harmlessDPO.
* dpo_lw  DPO LW: DPO on helpful + harmless pairs, each row's loss weighted by its objective's weight.
* bon     Best-of-N from the SFT model under w . r, r = the two DPO models' implicit rewards.
* morlhf  RLOO (TRL) on w . r with a KL penalty (same beta), from the SFT model, same rewards.
* conditioned  the demo's one weight-conditioned MODPO model, trained once, at every weight.
* mixing  decoding-time mixing (MOD) of the helpful and harmless DPO models: softmax(sum_k w_k log pi_k).

The demo pipeline always runs first, whatever `methods` says: every baseline uses its SFT model, data and
margin model (and reuses them when they are already there). Shared prerequisites are trained once and costed separately: the SFT model (every method), the harmless
DPO model (MODPO's margin model; an ingredient of soups; a reward of Best-of-N and MORLHF) and the helpful
DPO model (soups, Best-of-N, MORLHF). A method's total adds the prerequisites it uses, SFT excepted.

Finished work is reused: training runs and evaluations by their own records, and each method's points and
compute by `<output_dir>/<method>/points.json` (written atomically, keyed by everything that determines it).
The report goes to `<output_dir>/report/`: comparison.md, .json, .csv and the overlay plot comparison.png.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modpo.baselines.best_of_n import run_best_of_n
from modpo.baselines.dpo_lw import train_dpo_lw
from modpo.baselines.mixing import run_mixing as mix
from modpo.baselines.morlhf import MORLHFSettings, train_morlhf
from modpo.baselines.rewards import ImplicitRewards
from modpo.baselines.soups import make_soup
from modpo.cache import stable_hash, write_atomic
from modpo.data.encode import encode
from modpo.data.loaders import read_records
from modpo.demo import task
from modpo.demo.pipeline import run_demo
from modpo.errors import ConfigError
from modpo.experiments.compare_report import LABELS, REFERENCE_POINT, write_comparison
from modpo.demo.evaluator import DemoExactEvaluator
from modpo.front.generate import SamplingSettings
from modpo.front.sweep import evaluate_model, extra_model_record, point_name
from modpo.models import load_tokenizer
from modpo.run_config import StageConfig
from modpo.stages import run_preference

logger = logging.getLogger(__name__)

METHODS = ("modpo", "soups", "dpo_lw", "bon", "morlhf", "conditioned", "mixing")
PREREQUISITES = {"modpo": ["harmless_dpo"], "soups": ["helpful_dpo", "harmless_dpo"], "dpo_lw": [],
                 "bon": ["helpful_dpo", "harmless_dpo"], "morlhf": ["helpful_dpo", "harmless_dpo"],
                 "conditioned": ["harmless_dpo"], "mixing": ["helpful_dpo", "harmless_dpo"]}
POINTS_FILE = "points.json"


@dataclass
class CompareSettings:
    weights: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)
    seed: int = 0
    beta: float = 0.1
    bon_n: int = 16
    # DPO LW sees the union (2x the pairs of a MODPO run); one epoch gives it the same number of steps, pairs
    # and tokens as one MODPO run (2 epochs over the helpful pairs).
    dpo_lw_epochs: float = 1.0
    # MORLHF's budget per weight vector: 40 RLOO steps x 16 prompts x 4 completions = 2560 sampled responses
    # (a MODPO run makes 126 steps over 4000 pairs = 8000 scored responses). In probes on this task the
    # reward had flattened by step ~25 at this learning rate; the KL penalty uses MODPO's beta.
    morlhf: MORLHFSettings = field(default_factory=lambda: MORLHFSettings(
        steps=40, prompts_per_step=16, generations=4, learning_rate=1e-3, beta=0.1,
        max_completion_length=task.RESPONSE_LENGTH, min_new_tokens=task.RESPONSE_LENGTH))

    def weight_vectors(self) -> list[list[float]]:
        return task.weight_vectors(self.weights)


# ---------------------------------------------------------------------------------------------------------------
# Shared context: the demo's models, data and evaluation


@dataclass
class Context:
    out: Path
    settings: CompareSettings
    demo: Path
    sft: Path
    harmless_dpo: Path
    helpful_data: str
    harmless_data: str
    training: dict
    prompts: list
    sampling: object
    evaluators: list
    eval_key: str
    helpful_dpo: Path | None = None

    def run(self, path) -> dict:
        return json.loads((Path(path) / "modpo_run.json").read_text())


def _context(out: Path, settings: CompareSettings) -> Context:
    demo = out / "modpo"
    started = time.time()
    run_demo(str(demo), settings.weights, seed=settings.seed, beta=settings.beta)
    logger.info("demo pipeline ready in %.1fs", time.time() - started)
    front = json.loads((demo / "front" / "front.json").read_text())
    sampling = SamplingSettings(**front["sampling"])
    prompts = task.eval_prompts(front["num_prompts"], settings.seed + 3)  # the demo front's prompts
    evaluators = [DemoExactEvaluator()]
    sft = demo / "sft"
    harmless = demo / "harmless_dpo"
    ctx = Context(out=out, settings=settings, demo=demo, sft=sft, harmless_dpo=harmless,
                  helpful_data=str(demo / "data" / "helpful.jsonl"), harmless_data=str(demo / "data" / "harmless.jsonl"),
                  training=json.loads((harmless / "modpo_run.json").read_text())["config"]["training"],
                  prompts=prompts, sampling=sampling, evaluators=evaluators, eval_key="")
    ctx.eval_key = stable_hash({"prompts": prompts, "sampling": sampling.record(),
                                "evaluators": [e.describe() for e in evaluators]})
    # The demo front's own record of its SFT evaluation: same sampling, and its samples follow these prompts.

    sft_record = extra_model_record(demo / "front", sft)
    stored = json.loads(sft_record.read_text())
    per_prompt = sampling.samples_per_prompt
    if stored.get("sampling") != sampling.record() or any(
            s["prompt"] != prompts[i // per_prompt] for i, s in enumerate(stored.get("samples", []))):
        raise ConfigError(f"the evaluation settings rebuilt for the comparison differ from the demo front's "
                          f"({sft_record}); the methods would not be scored alike")
    return ctx


def _helpful_dpo(ctx: Context) -> Path:
    """The helpful DPO model: DPO on the helpful pairs with the margin model's exact settings."""

    if ctx.helpful_dpo is None:
        cfg = StageConfig(model=str(ctx.sft), output_dir=str(ctx.out / "shared" / "helpful_dpo"),
                          train_data=ctx.helpful_data, training=dict(ctx.training))
        ctx.helpful_dpo = run_preference(cfg, "dpo")
    return ctx.helpful_dpo


def _rewards(ctx: Context):
    return ImplicitRewards({"helpful": str(_helpful_dpo(ctx)), "harmless": str(ctx.harmless_dpo)}, reference=str(ctx.sft),
                           beta=ctx.settings.beta, append_eos=bool(ctx.training.get("append_eos", True)))


# ---------------------------------------------------------------------------------------------------------------
# Token accounting of the precompute passes (reference log-probs, margins) from the data


def preference_pass_tokens(path: str, tokenizer, append_eos: bool) -> int:
    """Non-pad tokens of one forward pass over every (prompt + chosen) and (prompt + rejected) of a file."""

    total = 0
    for row in read_records(path):
        prompt_ids, responses = encode(row["prompt"], [row["chosen"], row["rejected"]], tokenizer, append_eos)
        total += 2 * len(prompt_ids) + sum(map(len, responses))
    return total


def _shared_costs(ctx: Context, used: set[str]) -> dict:
    tokenizer = load_tokenizer(str(ctx.sft))
    eos = bool(ctx.training.get("append_eos", True))
    costs = {}
    sft = ctx.run(ctx.sft)
    sft_tokens = int(sft.get("final_log", {}).get("num_tokens", 0))
    costs["sft"] = {"what": "SFT (TRL SFTTrainer), shared by every method", "wall_seconds": sft["wall_seconds"],
                    "device": sft.get("device"), "tokens": {"forward": sft_tokens, "backward": sft_tokens}}
    for name, path, data in (("harmless_dpo", ctx.harmless_dpo, ctx.harmless_data),
                             ("helpful_dpo", ctx.helpful_dpo, ctx.helpful_data)):
        if name in used and path is not None:
            costs[name] = dpo_cost(path, data, tokenizer, eos)
    return costs


def dpo_cost(path, data: str, tokenizer, append_eos: bool) -> dict:
    """The compute of a DPO model (`path`, trained on `data`): its run's and one reference pass over the data."""
    run = json.loads((Path(path) / "modpo_run.json").read_text())
    reference = preference_pass_tokens(data, tokenizer, append_eos)
    return {"what": f"DPO on {Path(data).stem} pairs (+1 reference pass over them)",
            "wall_seconds": run["wall_seconds"], "device": run.get("device"),
            "tokens": {"forward": run["token_counts"]["forward"] + reference,
                       "backward": run["token_counts"]["backward"]}}


# ---------------------------------------------------------------------------------------------------------------
# Methods: each returns {"points": [...], "compute": {...}}


def _method_key(ctx: Context, method: str) -> str:
    identity = {"method": method, "weights": ctx.settings.weight_vectors(), "seed": ctx.settings.seed,
                "beta": ctx.settings.beta, "eval": ctx.eval_key, "sft": ctx.run(ctx.sft)["config_hash"],
                "harmless_dpo": ctx.run(ctx.harmless_dpo)["config_hash"]}
    if method in ("modpo", "conditioned"):
        identity["front"] = json.loads((ctx.demo / "front" / "front.json").read_text())["points"]
    if method in ("soups", "bon", "morlhf", "mixing"):
        identity["helpful_dpo"] = ctx.run(_helpful_dpo(ctx))["config_hash"]
    if method == "bon":
        identity["n"] = ctx.settings.bon_n
    if method == "dpo_lw":
        identity["epochs"] = ctx.settings.dpo_lw_epochs
    if method == "morlhf":
        identity["morlhf"] = ctx.settings.morlhf.record()
    return stable_hash(identity)


def _sum_runs(runs: list[dict]) -> dict:
    return {"forward": sum(r["token_counts"]["forward"] for r in runs),
            "backward": sum(r["token_counts"]["backward"] for r in runs)}


def _evaluate(ctx: Context, run_dir: Path, weights, extra=None) -> dict:
    return evaluate_model(run_dir, point_name(weights), weights, ctx.prompts, ctx.sampling, ctx.evaluators, extra)


def _precompute_tokens(ctx: Context) -> int:
    """Forward tokens computed once for every MODPO run (cached): SFT reference log-probs, margin model and its
    reference, over the helpful pairs."""
    return 3 * preference_pass_tokens(ctx.helpful_data, load_tokenizer(str(ctx.sft)),
                                      bool(ctx.training.get("append_eos", True)))


def run_modpo(ctx: Context) -> dict:
    front = json.loads((ctx.demo / "front" / "front.json").read_text())
    points = [p for p in front["points"] if p.get("method") == "modpo"]
    runs = [ctx.run(ctx.demo / "front" / "points" / p["name"]) for p in points]
    tokens = _sum_runs(runs)
    precompute = _precompute_tokens(ctx)
    tokens["forward"] += precompute
    compute = {"wall_seconds": round(sum(r["wall_seconds"] for r in runs), 2), "device": runs[0].get("device"),
               "tokens": tokens, "token_detail": {"training": _sum_runs(runs), "precompute_forward": precompute},
               "note": "one MODPO run per weight vector; reference log-probs and margins computed once and cached"}
    return {"points": points, "compute": compute}


def run_soups(ctx: Context) -> dict:
    helpful = _helpful_dpo(ctx)
    points, seconds = [], 0.0
    for weights in ctx.settings.weight_vectors():
        folder = make_soup([str(helpful), str(ctx.harmless_dpo)], weights,
                           ctx.out / "soups" / "points" / point_name(weights))
        seconds += ctx.run(folder)["wall_seconds"]
        points.append(_evaluate(ctx, folder, weights))
    compute = {"wall_seconds": round(seconds, 2), "device": "cuda" if torch.cuda.is_available() else "cpu",
               "tokens": {"forward": 0, "backward": 0},
               "note": "parameter interpolation only; the cost is in the two DPO models"}
    return {"points": points, "compute": compute}


def run_dpo_lw(ctx: Context) -> dict:
    datasets = {"helpful": read_records(ctx.helpful_data), "harmless": read_records(ctx.harmless_data)}
    points, runs = [], []
    for weights in ctx.settings.weight_vectors():
        run_dir = train_dpo_lw(str(ctx.sft), datasets, {"helpful": weights[0], "harmless": weights[1]},
                               ctx.out / "dpo_lw" / "points" / point_name(weights),
                               {**ctx.training, "num_train_epochs": ctx.settings.dpo_lw_epochs})
        run = ctx.run(run_dir)
        runs.append(run)
        points.append(_evaluate(ctx, run_dir, weights, {"train_seconds": run["wall_seconds"]}))
    tokenizer = load_tokenizer(str(ctx.sft))
    eos = bool(ctx.training.get("append_eos", True))
    precompute = (preference_pass_tokens(ctx.helpful_data, tokenizer, eos)
                  + preference_pass_tokens(ctx.harmless_data, tokenizer, eos))
    tokens = _sum_runs(runs)
    tokens["forward"] += precompute
    compute = {"wall_seconds": round(sum(r["wall_seconds"] for r in runs), 2), "device": runs[0].get("device"),
               "tokens": tokens, "token_detail": {"training": _sum_runs(runs), "precompute_forward": precompute},
               "note": (f"one DPO run per weight vector on the union of both preference sets, "
                        f"{ctx.settings.dpo_lw_epochs:g} epoch(s)")}
    return {"points": points, "compute": compute}


def run_bon(ctx: Context) -> dict:
    points, compute = run_best_of_n(str(ctx.sft), _rewards(ctx), ctx.prompts, ctx.sampling, ctx.settings.bon_n,
                                    ctx.settings.weight_vectors(), ctx.evaluators)
    compute["note"] = (f"no training; {ctx.settings.bon_n} SFT samples per response and 3 scoring passes each, "
                       "at inference time, for every response served (one candidate pool serves all weights)")
    return {"points": points, "compute": compute}


def run_morlhf(ctx: Context) -> dict:
    rewards = _rewards(ctx)
    train_prompts = [r["prompt"] for r in read_records(ctx.helpful_data)]  # MODPO's training prompts
    points, runs = [], []
    for weights in ctx.settings.weight_vectors():
        run_dir = train_morlhf(str(ctx.sft), rewards, train_prompts, weights,
                               ctx.out / "morlhf" / "points" / point_name(weights), ctx.settings.morlhf)
        run = ctx.run(run_dir)
        runs.append(run)
        points.append(_evaluate(ctx, run_dir, weights, {"train_seconds": run["wall_seconds"]}))
    detail: dict[str, int] = {}
    for r in runs:
        for k, v in r.get("token_detail", {}).items():
            detail[k] = detail.get(k, 0) + v
    s = ctx.settings.morlhf
    compute = {"wall_seconds": round(sum(r["wall_seconds"] for r in runs), 2), "device": runs[0].get("device"),
               "tokens": _sum_runs(runs), "token_detail": detail, "budget": s.record(),
               "note": (f"RLOO per weight vector: {s.steps} steps x {s.prompts_per_step} prompts x {s.generations} "
                        f"completions, lr {s.learning_rate:g}, KL beta {s.beta:g}")}
    return {"points": points, "compute": compute}


def run_conditioned(ctx: Context) -> dict:
    """The demo's one weight-conditioned model (trained once beside its front), at the comparison's weights."""
    front = json.loads((ctx.demo / "front" / "front.json").read_text())
    wanted = ctx.settings.weight_vectors()
    points = [{**p, "name": point_name(p["weights"])} for p in front["points"]
              if p.get("method") == "conditioned" and p["weights"] in wanted]
    if len(points) != len(wanted):
        raise ConfigError(f"the demo's conditioned model was not evaluated at every weight vector of {wanted}")
    run = ctx.run(ctx.demo / "front" / "conditioned")
    precompute = _precompute_tokens(ctx)
    tokens = {"forward": run["token_counts"]["forward"] + precompute, "backward": run["token_counts"]["backward"]}
    compute = {"wall_seconds": run["wall_seconds"], "device": run.get("device"), "tokens": tokens,
               "token_detail": {"training": run["token_counts"], "precompute_forward": precompute},
               "note": "one model for every weight vector, trained once; the same precompute as MODPO's"}
    return {"points": points, "compute": compute}


def run_mixing(ctx: Context) -> dict:
    points, compute = mix([str(_helpful_dpo(ctx)), str(ctx.harmless_dpo)], ctx.settings.weight_vectors(), ctx.prompts,
                          ctx.sampling, ctx.evaluators)
    compute["note"] = "no training; both DPO models run on every generated token, at inference time"
    return {"points": points, "compute": compute}


RUNNERS = {"modpo": run_modpo, "soups": run_soups, "dpo_lw": run_dpo_lw, "bon": run_bon, "morlhf": run_morlhf,
           "conditioned": run_conditioned, "mixing": run_mixing}


def _run_method(ctx: Context, method: str) -> dict:
    folder = ctx.out / method
    key = _method_key(ctx, method)
    record_file = folder / POINTS_FILE
    if record_file.exists():
        record = json.loads(record_file.read_text())
        if record.get("key") == key:
            logger.info("%s: reusing %s", method, record_file)
            return record
    started = time.time()
    result = RUNNERS[method](ctx)
    record = {"key": key, "method": method, "label": LABELS[method], "prerequisites": PREREQUISITES[method],
              "elapsed_seconds": round(time.time() - started, 2), **result}
    write_atomic(record_file, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str)))
    return record


# ---------------------------------------------------------------------------------------------------------------
# Aggregation and report


def device_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def run_compare(output_dir: str = "runs/compare", seed: int = 0, methods=METHODS,
                settings: CompareSettings | None = None) -> dict:
    """Run (or reuse) every method in `methods` and write the report folder; returns the JSON document."""
    unknown = [m for m in methods if m not in RUNNERS]
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown {unknown or 'none given'}; choose from {', '.join(METHODS)}")
    settings = settings or CompareSettings(seed=seed)
    settings.seed = seed
    settings.morlhf.seed = seed
    out = Path(output_dir)
    started = time.time()
    ctx = _context(out, settings)
    records = {}
    for method in [m for m in METHODS if m in methods]:
        t0 = time.time()
        records[method] = _run_method(ctx, method)
        logger.info("%s done in %.1fs", method, time.time() - t0)
    used = {p for m in records for p in PREREQUISITES[m]}
    shared = _shared_costs(ctx, used)
    front = json.loads((ctx.demo / "front" / "front.json").read_text())
    sft_point = next((p for p in front["points"] if p.get("weights") is None), None)
    meta = {"weights": list(settings.weights), "seed": seed, "beta": settings.beta, "bon_n": settings.bon_n,
            "dpo_lw_epochs": settings.dpo_lw_epochs,
            "morlhf_budget": settings.morlhf.record(), "evaluator": ctx.evaluators[0].describe(),
            "num_prompts": len(ctx.prompts), "sampling": ctx.sampling.record(), "device": device_description(),
            "compare_wall_seconds": round(time.time() - started, 2)}
    return write_comparison(out / "report", records, shared, meta, REFERENCE_POINT, sft_point)
