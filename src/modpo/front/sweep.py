"""`modpo front`: one MODPO model per weight vector, each sampled and scored, then the report.

Finished work is never redone: a point whose training run record matches is not retrained, and a point
whose evaluation record matches is not re-sampled. A killed sweep resumes at the interrupted point.
"""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import time
from pathlib import Path

import torch

from modpo.cache import stable_hash, write_atomic
from modpo.conditioning import check_request
from modpo.data.encode import is_conversational, prompt_as_encoded
from modpo.errors import ConfigError
from modpo.front.divergence import kl_summary, log_ratios
from modpo.front.evaluators import build_evaluators, pairwise_accuracy, score_samples
from modpo.front.generate import SamplingSettings, sample_responses
from modpo.front.report import summarize, write_report
from modpo.front.steer import steering
from modpo.models import load_model, load_tokenizer
from modpo.preflight import guarded_front
from modpo.run_config import FrontConfig, StageConfig, from_dict
from modpo.stages import load_data, run_preference

logger = logging.getLogger(__name__)

EVAL_FILE = "evaluation.json"
SIDES_OF_A_ROW = ("prompt", "chosen", "rejected")
EVALUATION_KEYS = {"prompts", "samples_per_prompt", "max_new_tokens", "min_new_tokens", "temperature", "top_p", "seed", "batch_size",
                   "evaluators", "reference_point", "extra_models", "kl_reference"}


def point_name(weights: list[float]) -> str:
    """The point's folder name, made from the numbers alone (`w0.2_0.8`): no user text reaches the path."""
    if isinstance(weights, (str, bytes)) or not all(isinstance(w, numbers.Real) and not isinstance(w, bool)
                                                    for w in weights):
        raise ConfigError(f"weights {weights!r}: a weight vector is a list of numbers")
    return "w" + "_".join(f"{w:g}" for w in weights)


def evaluation_prompts(spec, train_data=None) -> list:
    """The prompts to sample, in the form training encoded prompts (`data.encode.prompt_as_encoded`): those of a
    preference file each as its row was encoded; a list as given, its text prompts as user turns where the training
    rows (`train_data`, the training stage's data spec) are chat rows, whose text prompts training templates."""
    if isinstance(spec, list):
        train, _ = load_data(train_data, "train_data") if train_data is not None and spec else (None, None)
        chat = train is not None and len(train) > 0 and is_conversational(*(train[0][k] for k in SIDES_OF_A_ROW))
        return [prompt_as_encoded(prompt, chat) for prompt in spec]

    data, _ = load_data(spec, "evaluation.prompts")
    return [prompt_as_encoded(row["prompt"], is_conversational(*(row[k] for k in SIDES_OF_A_ROW))) for row in data]


def extra_model_record(front_dir: Path, model: str | Path) -> Path:
    """Where a front keeps the evaluation of an extra (not trained here) model: inside the front's own folder,
    under a name made from a hash of the model's path, so no text from the config becomes a path."""
    where = Path(model).resolve() if Path(model).exists() else model  # a local folder however it was spelled
    return Path(front_dir) / "extra_models" / f"{stable_hash({'model': str(where)})[:16]}.json"


def evaluate_model(model_dir: Path, name: str, weights, prompts, settings: SamplingSettings, evaluators,
                   extra: dict | None = None, record_file: Path | None = None, condition: list | None = None,
                   kl_reference: str | None = None) -> dict:
    """Sample `model_dir` on `prompts` and score; reuses the record (default `model_dir/evaluation.json`) if it
    matches the prompts, sampling settings, evaluators and the model's run. `condition`: the weights a
    weight-conditioned model is steered to (`modpo.conditioning`). `kl_reference`: a model to estimate
    KL(model || reference) against from the samples (`modpo.front.divergence`). The record keeps every sample with
    its scores (and log-ratio), so the means can be recomputed from the text."""

    key = stable_hash({"prompts": prompts, "settings": settings.record(), "model": str(model_dir),
                       "run": _run_hash(model_dir), "evaluators": [e.describe() for e in evaluators],
                       "condition": condition, "kl_reference": kl_reference and str(kl_reference)})
    record_file = record_file or model_dir / EVAL_FILE
    record = _read_record(record_file)
    if record.get("key") == key and "point" in record:
        return record["point"]
    started = time.time()
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir)).to("cuda" if torch.cuda.is_available() else "cpu")
    shown = steering(model_dir, model, tokenizer, condition) if condition is not None else contextlib.nullcontext()
    with shown as prefix:
        samples = sample_responses(model, tokenizer, prompts, settings, desc=f"sampling {name}", prefix=prefix,
                                   keep_ids=kl_reference is not None)
        kl = _kl(model, samples, tokenizer, kl_reference, prefix, settings) if kl_reference is not None else None
    scores, malformed, objectives = score_samples(evaluators, samples)
    point = summarize(name, weights, scores, objectives, malformed,
                      {"sampling_seconds": round(time.time() - started, 2), **(extra or {})})
    if kl is not None:
        point["kl"] = kl_summary(kl, settings.temperature, settings.top_p, str(kl_reference))
    kept = [{"prompt": s["prompt"], "response": s["response"], "sample": s["sample"],
             "scores": dict(zip(objectives, row)), **({"log_ratio": kl[i]} if kl is not None else {})}
            for i, (s, row) in enumerate(zip(samples, scores.tolist()))]
    write_atomic(record_file, lambda tmp: tmp.write_text(json.dumps(
        {"key": key, "model": str(model_dir), "point": point, "sampling": settings.record(), "samples": kept},
        indent=2, default=str)))
    return point


def _kl(model, samples: list[dict], tokenizer, reference: str, prefix, settings) -> list[float]:
    """Each sample's log pi(y|x) - log pi_ref(y|x) (`modpo.front.divergence`)."""
    device = next(model.parameters()).device
    ref = load_model(str(reference)).to(device)
    ratios = log_ratios(model, ref, [s["prompt_ids"] for s in samples], [s["response_ids"] for s in samples],
                        tokenizer.pad_token_id, policy_prefix=prefix)
    return ratios.tolist()


def check_evaluators(evaluators, out: Path, say) -> list[dict]:
    """The held-out pairwise accuracy of every evaluator with a `check`, measured before anything is sampled and
    kept in `out/evaluator_checks.json` (reused while the evaluator and its pairs are the same); an evaluator under
    its floor gets a warning line, and the report marks it not usable."""
    record_file = out / "evaluator_checks.json"
    record = _read_record(record_file)
    results, measured = [], False
    for evaluator in evaluators:
        if getattr(evaluator, "check", None) is None:
            continue
        key = stable_hash({"evaluator": evaluator.describe(), "check": evaluator.check})
        if key not in record:
            pairs, _ = load_data(evaluator.check["pairs"], "evaluation.evaluators.check.pairs")
            record[key], measured = pairwise_accuracy(evaluator, pairs), True
        for r in record[key]:
            say(f"evaluator {r['objective']}: held-out pairwise accuracy {r['accuracy']:.3f} ± {r['stderr']:.3f} on "
                f"{r['pairs']} pairs (floor {r['floor']:g})")
            if not r["usable"]:
                logger.warning("evaluator %s (%s) is not usable: held-out pairwise accuracy %.3f is under its floor "
                               "%g; the front's %s column does not rank the points", r["objective"], r["evaluator"],
                               r["accuracy"], r["floor"], r["objective"])
        results += record[key]
    if measured:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(record_file, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
    return results


def _read_record(path: Path) -> dict:
    """A JSON record, or {} where there is none or it cannot be read (with a warning)."""
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        logger.warning("%s is unreadable (%s); ignoring it", path, err)
        return {}
    return record if isinstance(record, dict) else {}


def _run_hash(model_dir: Path) -> str | None:
    return _read_record(model_dir / "modpo_run.json").get("config_hash")


@guarded_front
def run_front(cfg: FrontConfig, overwrite: bool = False, title: str = "MODPO front", resume: bool = False,
              optimum=None, say=logger.info) -> dict:
    """Train (or reuse) every point, evaluate it, write the report folder; returns the report document.

    `optimum`, where the caller knows it: a callable from a weight vector to the best value of every evaluated
    objective, reported against the front (`modpo.front.report.optimum_section`). `say` gets one line per point
    with its times (default: the module's logger at INFO)."""

    unknown = set(cfg.evaluation) - EVALUATION_KEYS
    if unknown:
        raise ConfigError(f"evaluation: unknown key(s) {', '.join(sorted(unknown))}")
    if not cfg.weights or not all(isinstance(w, list) for w in cfg.weights):
        raise ConfigError("weights: give a list of weight vectors, e.g. [[0.2, 0.8], [0.8, 0.2]]")
    named: dict[str, list] = {}
    for weights in cfg.weights:  # names keep 6 significant digits: two vectors must not share a folder
        name = point_name(weights)
        if named.setdefault(name, weights) != weights:
            raise ConfigError(f"weights: {named[name]} and {weights} both give the point name {name} (6 significant "
                              "digits); make them differ more")
    out = Path(cfg.output_dir)
    evaluation = cfg.evaluation
    prompts = evaluation_prompts(evaluation.get("prompts", []), cfg.train.get("train_data"))
    if not prompts:
        raise ConfigError("evaluation.prompts: no prompts to sample")
    settings = SamplingSettings(**{k: evaluation[k] for k in EVALUATION_KEYS if k in SamplingSettings.__annotations__
                                   and k in evaluation})
    evaluators = build_evaluators(evaluation.get("evaluators", []))
    kl_reference = evaluation.get("kl_reference")
    points, started = [], time.time()
    checks = check_evaluators(evaluators, out, say)
    for name, model_dir in (evaluation.get("extra_models") or {}).items():
        points.append(evaluate_model(Path(model_dir), name, None, prompts, settings, evaluators,
                                     record_file=extra_model_record(out, model_dir), kl_reference=kl_reference))
    for weights in cfg.weights:
        name = point_name(weights)
        train = dict(cfg.train)
        train["training"] = {**train.get("training", {}), "weights": weights}
        train["output_dir"] = str(out / "points" / name)
        stage = from_dict(StageConfig, train, f"front point {name}")
        t0 = time.time()
        run_dir = run_preference(stage, "train", overwrite=overwrite,
                                 resume=resume and any(Path(stage.output_dir).glob("checkpoint-*")))
        run = json.loads((run_dir / "modpo_run.json").read_text())
        t1 = time.time()
        points.append(evaluate_model(run_dir, name, weights, prompts, settings, evaluators,
                                     {"method": "modpo", "train_seconds": run.get("wall_seconds"),
                                      "token_counts": run.get("token_counts"),
                                      "margin_scales": run.get("margin_scales")}, kl_reference=kl_reference))
        say(f"point {name}: trained or reused in {t1 - t0:.1f} s, sampled and scored in {time.time() - t1:.1f} s")
    if cfg.conditioned:
        points += conditioned_points(cfg, out, prompts, settings, evaluators, overwrite, say, kl_reference)
    objectives = tuple(o for o in points[0] if isinstance(points[0][o], dict) and "mean" in points[0][o])
    reference = evaluation.get("reference_point") or [min(p[o]["mean"] for p in points) for o in objectives]
    meta = {"sampling": settings.record(), "evaluators": [e.describe() for e in evaluators],
            "training_margin_sources": cfg.train.get("margins", []) or "chosen_margins/rejected_margins columns",
            **({"evaluator_checks": checks} if checks else {}),
            "num_prompts": len(prompts), "wall_seconds": round(time.time() - started, 2),
            "reference_point_rule": "given" if evaluation.get("reference_point") else "per-objective minimum over points"}
    return write_report(out, points, objectives, list(reference), meta, title, optimum)


def conditioned_points(cfg: FrontConfig, out: Path, prompts, settings, evaluators, overwrite: bool, say,
                       kl_reference: str | None = None) -> list[dict]:
    """One weight-conditioned model, trained once (`out/conditioned`), evaluated at every weight vector asked for."""
    train = dict(cfg.train)
    train["training"] = {**train.get("training", {}), **cfg.conditioned, "weights": cfg.weights[0]}
    train["output_dir"] = str(out / "conditioned")
    stage = from_dict(StageConfig, train, "front: conditioned")
    t0 = time.time()
    run_dir = run_preference(stage, "train", overwrite=overwrite)
    run = json.loads((run_dir / "modpo_run.json").read_text())
    say(f"conditioned model: trained or reused in {time.time() - t0:.1f} s")
    points = []
    for weights in cfg.conditioned_weights or cfg.weights:
        try:
            grid = check_request(weights, len(cfg.weights[0]))
        except ValueError as err:
            raise ConfigError(f"conditioned_weights: {err}") from None
        name = "conditioned_" + point_name(grid)
        t1 = time.time()
        points.append(evaluate_model(run_dir, name, grid, prompts, settings, evaluators,
                                     {"method": "conditioned", "train_seconds": run.get("wall_seconds"),
                                      "token_counts": run.get("token_counts")},
                                     record_file=out / "conditioned_evaluations" / f"{name}.json", condition=grid,
                                     kl_reference=kl_reference))
        say(f"point {name}: sampled and scored in {time.time() - t1:.1f} s")
    return points
