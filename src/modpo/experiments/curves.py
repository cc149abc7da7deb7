"""`modpo compare --seeds ...`: every method of the comparison as a compute-vs-quality curve, over seeds.

Per seed, the demo's data, SFT model and margin model (`demo.pipeline.prepare_models`), the demo front's
evaluation and the exact optimum under that SFT model (`demo.optimum`). Per method and learning rate, one
training run per weight vector at the method's largest budget with a constant learning rate and a checkpoint
every 1/`checkpoints` of its steps: the checkpoint at step s is a run of budget s. Best-of-N's budget is N
(inference-time compute), from one pool of max(N) candidates.

The compute of a budget is the run's own token counts (forward, backward) and wall seconds scaled by s / S
(S the run's steps), plus what is done once whatever the budget (the reference and margin passes the runs
share); exact for whole epochs (every epoch sees the same pairs), nearly so within one. Prerequisites (the
margin model for MODPO, both DPO reward models for Best-of-N and MORLHF) count at their full budget.

Finished work is reused: training runs and evaluations by their own records, each (seed, learning rate,
method, budget) curve by `<output_dir>/seed<s>/lr<lr>/<method>/budget-<hash>/curve.json`, keyed by everything
that determines it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from modpo.baselines.best_of_n import run_best_of_n_sizes
from modpo.baselines.dpo_lw import train_dpo_lw
from modpo.baselines.morlhf import MORLHFSettings, train_morlhf
from modpo.baselines.rewards import ImplicitRewards
from modpo.baselines.soups import make_soup
from modpo.cache import stable_hash, write_atomic
from modpo.data.loaders import read_records
from modpo.demo import task
from modpo.demo.optimum import exact_optimum
from modpo.demo.pipeline import MARGIN_TRAINING, MODPO_TRAINING, evaluation_settings, prepare_models
from modpo.errors import ConfigError
from modpo.experiments.compare import device_description, dpo_cost, preference_pass_tokens
from modpo.experiments.compare_report import REFERENCE_POINT
from modpo.experiments.curves_report import write_curves
from modpo.demo.evaluator import DemoExactEvaluator
from modpo.front.generate import SamplingSettings
from modpo.front.sweep import evaluate_model, point_name
from modpo.models import load_tokenizer
from modpo.run_config import StageConfig
from modpo.stages import run_preference

logger = logging.getLogger(__name__)

CURVE_FILE = "curve.json"
METHODS = ("modpo", "soups", "dpo_lw", "bon", "morlhf")  # the methods with a curve (a budget to sweep)
TRAINED = ("modpo", "soups", "dpo_lw", "morlhf")
PREREQUISITES = {"modpo": ["harmless_dpo"], "soups": [], "dpo_lw": [], "bon": ["helpful_dpo", "harmless_dpo"],
                 "morlhf": ["helpful_dpo", "harmless_dpo"]}


@dataclass
class CurveSettings:
    """The sweep: seeds, the learning-rate grid every trained method gets, and each method's largest budget."""

    seeds: tuple = (0, 1, 2)
    learning_rates: tuple = (1e-3, 3e-3)
    methods: tuple = METHODS
    weights: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)
    beta: float = 0.1
    checkpoints: int = 6          # budgets per trained run: a checkpoint every 1/checkpoints of its steps
    modpo_epochs: float = 6       # over the helpful pairs, per weight vector (the demo's 4, and more)
    soup_epochs: float = 6        # each of the two DPO models
    dpo_lw_epochs: float = 3      # over the union of both pair sets: as many pairs as MODPO's 6 epochs
    morlhf_steps: int = 120       # RLOO steps x 16 prompts x 4 completions, per weight vector (compare: 40)
    bon_sizes: tuple = (1, 2, 4, 8, 16)

    def weight_vectors(self) -> list[list[float]]:
        return task.weight_vectors(self.weights)

    def record(self) -> dict:
        return asdict(self)


@dataclass
class Seed:
    """One seed's models, data, evaluation and optimum."""

    out: Path
    seed: int
    models: dict
    helpful_dpo: Path
    prompts: list
    sampling: SamplingSettings
    evaluators: list
    optimal: list             # the optimum's point at every weight vector
    identity: dict            # what every curve of this seed depends on
    sft_point: dict | None = None  # the SFT model's evaluation: every trained method's budget 0


def _seed(out: Path, seed: int, s: CurveSettings) -> Seed:
    models = prepare_models(out / "demo", seed, s.beta)
    training = {**models["preference_training"], **MARGIN_TRAINING}
    helpful = run_preference(StageConfig(model=str(models["sft"]), output_dir=str(out / "shared" / "helpful_dpo"),
                                         train_data=models["helpful"], training=training), "dpo")
    evaluation = evaluation_settings(seed)
    sampling = SamplingSettings(**{f.name: evaluation[f.name] for f in fields(SamplingSettings) if f.name in evaluation})
    optimum = exact_optimum(str(models["sft"]), evaluation["prompts"], s.beta)
    evaluators = [DemoExactEvaluator()]
    runs = {name: _run(models[name] if name != "helpful_dpo" else helpful)["config_hash"]
            for name in ("sft", "harmless_dpo", "helpful_dpo")}
    identity = {"seed": seed, "weights": s.weight_vectors(), "beta": s.beta, "runs": runs,
                "eval": stable_hash({"prompts": evaluation["prompts"], "sampling": sampling.record(),
                                     "evaluators": [e.describe() for e in evaluators]})}
    ctx = Seed(out, seed, models, helpful, evaluation["prompts"], sampling, evaluators,
               [optimum(w) for w in s.weight_vectors()], identity)
    ctx.sft_point = evaluate_model(models["sft"], "sft", None, ctx.prompts, sampling, evaluators,
                                   record_file=out / "sft_evaluation.json")
    return ctx


def _start(ctx: Seed, s: CurveSettings, once: dict) -> dict:
    """Budget 0 of a trained method: the SFT model at every weight vector, costing only what is done once."""
    return {"budget": 0, "share": 0.0, "points": [{**ctx.sft_point, "name": point_name(w), "weights": w}
                                                  for w in s.weight_vectors()],
            "tokens": {"forward": once.get("forward", 0), "backward": once.get("backward", 0)}, "wall_seconds": 0.0}


def _run(path) -> dict:
    return json.loads((Path(path) / "modpo_run.json").read_text())


def budgets(run_dir: Path) -> list[tuple[int, int, Path]]:
    """(step, steps of the whole run, model folder) of every checkpoint before the end, then the final model."""
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        raise ConfigError(f"{run_dir}: no checkpoints; the budget curve needs the run saved every few steps")
    total = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["max_steps"]
    return [(int(p.name.split("-")[1]), total, p) for p in checkpoints if int(p.name.split("-")[1]) < total] + [
        (total, total, run_dir)]


def _evaluate(ctx: Seed, folder: Path, weights, record_dir: Path, tag: str) -> dict:
    record = record_dir / "evaluations" / f"{tag}_{point_name(weights)}.json"
    return evaluate_model(folder, point_name(weights), weights, ctx.prompts, ctx.sampling, ctx.evaluators,
                          record_file=record)


def _saving(s: CurveSettings) -> dict:
    return {"save_strategy": "steps", "save_steps": 1 / s.checkpoints, "save_only_model": True,
            "save_total_limit": s.checkpoints + 1}  # keep every checkpoint


def _per_weight_curve(ctx: Seed, s: CurveSettings, runs: list[Path], once: dict) -> list[dict]:
    """The curve of a front with one run per weight vector: at checkpoint i, every run's i-th model; tokens and
    seconds scaled by steps done, plus `once` (tokens spent once whatever the budget). Budget 0 is the SFT model."""
    weights = s.weight_vectors()
    per_run = [budgets(r) for r in runs]
    if len({len(b) for b in per_run}) != 1:
        raise ConfigError(f"runs {runs} have different checkpoints; rerun with the same settings")
    curve = [_start(ctx, s, once)]
    for i in range(len(per_run[0])):
        points, forward, backward, wall = [], once.get("forward", 0), once.get("backward", 0), 0.0
        for run_dir, w, run_budgets in zip(runs, weights, per_run):
            step, total, folder = run_budgets[i]
            run, share = _run(run_dir), step / total
            forward += run["token_counts"]["forward"] * share
            backward += run["token_counts"]["backward"] * share
            wall += run["wall_seconds"] * share
            points.append(_evaluate(ctx, folder, w, run_dir, f"step{step}_{run['config_hash'][:12]}"))
        step, total, _ = per_run[0][i]
        curve.append({"budget": step, "budget_unit": "steps per run", "share": step / total, "points": points,
                      "tokens": {"forward": round(forward), "backward": round(backward)}, "wall_seconds": round(wall, 2)})
    return curve


def curve_modpo(ctx: Seed, s: CurveSettings, lr: float, folder: Path) -> list[dict]:
    m = ctx.models
    training = {**m["preference_training"], **MODPO_TRAINING, "num_train_epochs": s.modpo_epochs,
                "learning_rate": lr, **_saving(s)}
    margins = [{"type": "implicit_reward", "model": str(m["harmless_dpo"]), "ref_model": str(m["sft"]),
                "beta": s.beta, "append_eos": False}]
    runs = [run_preference(StageConfig(model=str(m["sft"]), output_dir=str(folder / "points" / point_name(w)),
                                       train_data=m["helpful"], training={**training, "weights": w}, margins=margins),
                           "train") for w in s.weight_vectors()]
    # once for all runs (cached): SFT reference log-probs, the margin model's and its reference's
    once = {"forward": 3 * preference_pass_tokens(m["helpful"], load_tokenizer(str(m["sft"])), False)}
    return _per_weight_curve(ctx, s, runs, once)


def curve_dpo_lw(ctx: Seed, s: CurveSettings, lr: float, folder: Path) -> list[dict]:
    m = ctx.models
    datasets = {"helpful": read_records(m["helpful"]), "harmless": read_records(m["harmless"])}
    training = {**m["preference_training"], **MARGIN_TRAINING, "num_train_epochs": s.dpo_lw_epochs,
                "learning_rate": lr, **_saving(s)}
    runs = [train_dpo_lw(str(m["sft"]), datasets, {"helpful": w[0], "harmless": w[1]},
                         folder / "points" / point_name(w), training) for w in s.weight_vectors()]
    tokenizer = load_tokenizer(str(m["sft"]))
    once = {"forward": sum(preference_pass_tokens(m[k], tokenizer, False) for k in ("helpful", "harmless"))}
    return _per_weight_curve(ctx, s, runs, once)


def curve_morlhf(ctx: Seed, s: CurveSettings, lr: float, folder: Path) -> list[dict]:
    m = ctx.models
    rewards = _rewards(ctx, s)
    settings = MORLHFSettings(steps=s.morlhf_steps, prompts_per_step=16, generations=4, learning_rate=lr, beta=s.beta,
                              max_completion_length=task.RESPONSE_LENGTH, min_new_tokens=task.RESPONSE_LENGTH,
                              seed=ctx.seed, save_fraction=1 / s.checkpoints)
    prompts = [r["prompt"] for r in read_records(m["helpful"])]  # MODPO's training prompts
    runs = [train_morlhf(str(m["sft"]), rewards, prompts, w, folder / "points" / point_name(w), settings)
            for w in s.weight_vectors()]
    return _per_weight_curve(ctx, s, runs, {})


def curve_soups(ctx: Seed, s: CurveSettings, lr: float, folder: Path) -> list[dict]:
    """Two DPO models trained at `lr`, souped at their i-th checkpoints: the budget is their training."""
    m = ctx.models
    training = {**m["preference_training"], **MARGIN_TRAINING, "num_train_epochs": s.soup_epochs,
                "learning_rate": lr, **_saving(s)}
    runs = [run_preference(StageConfig(model=str(m["sft"]), output_dir=str(folder / f"{k}_dpo"), train_data=m[k],
                                       training=training), "dpo") for k in ("helpful", "harmless")]
    tokenizer = load_tokenizer(str(m["sft"]))
    reference = sum(preference_pass_tokens(m[k], tokenizer, False) for k in ("helpful", "harmless"))
    per_run = [budgets(r) for r in runs]
    tag = stable_hash([_run(r)["config_hash"] for r in runs])[:12]
    curve = [_start(ctx, s, {"forward": reference})]
    for (step, total, helpful), (_, _, harmless) in zip(*per_run):
        points, wall = [], sum(_run(r)["wall_seconds"] for r in runs) * step / total
        for w in s.weight_vectors():
            soup = make_soup([str(helpful), str(harmless)], w, folder / "soups" / f"step{step}_{tag}" / point_name(w))
            wall += _run(soup)["wall_seconds"]
            points.append(_evaluate(ctx, soup, w, soup, "soup"))
        tokens = {"forward": round(sum(_run(r)["token_counts"]["forward"] for r in runs) * step / total) + reference,
                  "backward": round(sum(_run(r)["token_counts"]["backward"] for r in runs) * step / total)}
        curve.append({"budget": step, "budget_unit": "steps per DPO model", "share": step / total, "points": points,
                      "tokens": tokens, "wall_seconds": round(wall, 2)})
    return curve


def curve_bon(ctx: Seed, s: CurveSettings, lr: float | None, folder: Path) -> list[dict]:
    results = run_best_of_n_sizes(str(ctx.models["sft"]), _rewards(ctx, s), ctx.prompts, ctx.sampling,
                                  list(s.bon_sizes), s.weight_vectors(), ctx.evaluators)
    return [{"budget": n, "budget_unit": "candidates per response (N, at inference time)", "share": n / max(s.bon_sizes),
             "points": points, "tokens": compute["tokens"], "wall_seconds": compute["wall_seconds"]}
            for n, (points, compute) in results.items()]


def _rewards(ctx: Seed, s: CurveSettings) -> ImplicitRewards:
    return ImplicitRewards({"helpful": str(ctx.helpful_dpo), "harmless": str(ctx.models["harmless_dpo"])},
                           reference=str(ctx.models["sft"]), beta=s.beta, append_eos=False)


CURVES = {"modpo": curve_modpo, "soups": curve_soups, "dpo_lw": curve_dpo_lw, "bon": curve_bon,
          "morlhf": curve_morlhf}
BUDGET_SETTINGS = {"modpo": ("modpo_epochs", "checkpoints"), "soups": ("soup_epochs", "checkpoints"),
                   "dpo_lw": ("dpo_lw_epochs", "checkpoints"), "morlhf": ("morlhf_steps", "checkpoints"),
                   "bon": ("bon_sizes",)}


def _curve(ctx: Seed, s: CurveSettings, method: str, lr: float | None) -> dict:
    budget = {k: getattr(s, k) for k in BUDGET_SETTINGS[method]}
    # a folder per budget: a sweep with larger budgets trains beside the smaller one, never over it
    folder = (ctx.out / (f"lr{lr:g}" if lr is not None else "untrained") / method
              / f"budget-{stable_hash(budget)[:8]}")
    identity = {**ctx.identity, "method": method, "learning_rate": lr, "budget": budget,
                "budget_0": "sft" if method in TRAINED else None}
    key = stable_hash(identity)
    record_file = folder / CURVE_FILE
    if record_file.exists():
        record = json.loads(record_file.read_text())
        if record.get("key") == key:
            logger.info("seed %d, %s, lr %s: reusing %s", ctx.seed, method, lr, record_file)
            return record
    started = time.time()
    curve = CURVES[method](ctx, s, lr, folder)
    record = {"key": key, "method": method, "seed": ctx.seed, "learning_rate": lr, "budget": budget, "curve": curve,
              "elapsed_seconds": round(time.time() - started, 2)}
    write_atomic(record_file, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str)))
    logger.info("seed %d, %s, lr %s: done in %.1fs", ctx.seed, method, lr, time.time() - started)
    return record


def prerequisite_costs(ctx: Seed) -> dict:
    tokenizer = load_tokenizer(str(ctx.models["sft"]))
    return {"harmless_dpo": dpo_cost(ctx.models["harmless_dpo"], ctx.models["harmless"], tokenizer, False),
            "helpful_dpo": dpo_cost(ctx.helpful_dpo, ctx.models["helpful"], tokenizer, False)}


def check_settings(s: CurveSettings) -> None:
    unknown = [m for m in s.methods if m not in CURVES]
    if unknown or not s.methods:
        raise ConfigError(f"--methods: unknown {unknown or 'none given'}; choose from {', '.join(METHODS)}")
    if not s.seeds or len(set(s.seeds)) != len(s.seeds):
        raise ConfigError(f"--seeds {list(s.seeds)}: give distinct seeds, e.g. 0,1,2")
    if not s.learning_rates or any(not lr > 0 for lr in s.learning_rates):
        raise ConfigError(f"--learning-rates {list(s.learning_rates)}: give positive numbers, e.g. 1e-3,3e-3")


def run_curves(output_dir: str, settings: CurveSettings | None = None) -> dict:
    """Run (or reuse) every curve and write `<output_dir>/report/curves.{md,json,png}`; returns the JSON document.

    Runs on one intra-op thread (restored after), as the demo does."""
    s = settings or CurveSettings()
    check_settings(s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_curves(Path(output_dir), s)
    finally:
        torch.set_num_threads(threads)


def _run_curves(out: Path, s: CurveSettings) -> dict:
    started = time.time()
    records, seeds = [], {}
    for seed in s.seeds:
        ctx = _seed(out / f"seed{seed}", seed, s)
        seeds[seed] = {"optimal_points": ctx.optimal, "prerequisites": prerequisite_costs(ctx),
                       "sft_wall_seconds": _run(ctx.models["sft"])["wall_seconds"]}
        for method in [m for m in METHODS if m in s.methods]:
            for lr in (s.learning_rates if method in TRAINED else [None]):
                records.append(_curve(ctx, s, method, lr))
    meta = {"settings": s.record(), "reference_point": REFERENCE_POINT, "device": device_description(),
            "prerequisites_of": PREREQUISITES, "evaluator": DemoExactEvaluator().describe(),
            "sampling": ctx.sampling.record(), "num_prompts": len(ctx.prompts),
            "sweep_wall_seconds": round(time.time() - started, 2)}  # this invocation, reusing finished work
    return write_curves(out / "report", records, seeds, meta)
