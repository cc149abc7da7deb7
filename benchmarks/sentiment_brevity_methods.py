"""MODPO against MORLHF and DPO soups on the `sentiment_brevity` recipe's task, at matched compute.

Run after the recipe (`modpo recipe sentiment_brevity root=ROOT data_dir=DATA`):

    python benchmarks/sentiment_brevity_methods.py --root ROOT --data-dir DATA --out docs/results/sentiment_brevity

It trains and evaluates, with the recipe's own evaluation (prompts, sampling, scorers, KL reference):

* soups   theta = w_0 theta_sentiment + w_1 theta_brevity of the two LoRA models the recipe trained: the MODPO point
          at w = (1, 0) (DPO on the sentiment pairs) and the brevity DPO model.
* morlhf  TRL's RLOO on w . r with the ground-truth rewards r_0 = sentiment / tau_sentiment and
          r_1 = brevity_scale * (minus words), the units the labels and the margin are in; the same LoRA, beta and
          starting model. Its budget per weight defaults to MODPO's compute per point (below). Scoring by the true
          rewards favours MORLHF: MODPO sees the sentiment scorer only through 128 labelled pairs.

Compute is counted as in `modpo compare`: non-pad tokens, forward + 2 x backward, generation included (prompt +
completion tokens per sampled response), prerequisites included: the label stage's sampling (every pair-based
method), one reference pass over the pairs (MODPO's precompute; DPO's), the brevity DPO model and its margin pass
(option b, soups). Scorers run no model and cost no tokens.

Writes to --out: methods.json (every point with means, standard errors, KL and compute; hypervolumes with one
reference point for all), methods.md, front.png (both scorers), reward_kl.png (w . r against KL per weight) and
samples/<method>_<point>.jsonl (prompt, response, scores, log-ratio of every evaluated sample).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import matplotlib.pyplot as plt

from modpo.baselines.morlhf import MORLHFSettings, train_morlhf
from modpo.baselines.scorer_rewards import ScorerRewards
from modpo.baselines.soups import make_soup
from modpo.data.encode import encode_prompt
from modpo.experiments.compare import preference_pass_tokens
from modpo.front.evaluators import build_evaluators
from modpo.front.generate import SamplingSettings
from modpo.front.report import hypervolume, non_dominated
from modpo.front.sweep import EVAL_FILE, evaluate_model, evaluation_prompts, extra_model_record, point_name
from modpo.models import load_tokenizer
from modpo.recipes import load_recipe
from modpo.run_config import read_yaml

OBJECTIVES = ("sentiment", "minus_words")
COLORS = {"base": "black", "modpo_rule": "tab:blue", "modpo_implicit": "tab:cyan", "soups": "tab:orange",
          "morlhf": "tab:red"}


def cost(tokens: dict) -> int:
    return int(tokens["forward"] + 2 * tokens["backward"])


def sampling_tokens(samples_file: Path, tokenizer) -> int:
    """Forward tokens of generating every sample of the label stage: prompt + response tokens each."""
    total = 0
    for line in samples_file.read_text().splitlines():
        s = json.loads(line)
        total += len(encode_prompt(s["prompt"], tokenizer)) + len(tokenizer(s["response"])["input_ids"]) + 1
    return total


def run_tokens(folder: Path) -> dict:
    return json.loads((folder / "modpo_run.json").read_text())["token_counts"]


def evaluation_record(folder_or_file: Path) -> dict:
    path = folder_or_file / EVAL_FILE if folder_or_file.is_dir() else folder_or_file
    return json.loads(path.read_text())


def true_reward(point: dict, weights, tau: float, scale: float) -> float:
    """w . r at the point's means, r in the labels' units (sentiment / tau, scale x minus words)."""
    return weights[0] * point["sentiment"]["mean"] / tau + weights[1] * scale * point["minus_words"]["mean"]


def parse_weights(text: str) -> list[list[float]]:
    return [[float(w) for w in vector.split(",")] for vector in text.split(";") if vector.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", default="docs/results/sentiment_brevity")
    parser.add_argument("--morlhf-weights", default="0.6,0.4;0.3,0.7", help="';'-separated weight vectors")
    parser.add_argument("--soup-weights", default="0.6,0.4;0.3,0.7", help="';'-separated weight vectors")
    parser.add_argument("--morlhf-steps", type=int, default=0, help="0: matched to MODPO's compute per point")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--only-morlhf", action="store_true", help="train and evaluate MORLHF alone (needs "
                        "--morlhf-steps; the fronts need not have run)")
    args = parser.parse_args()
    root, out = Path(args.root), Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    recipe, stages = load_recipe("sentiment_brevity", {"root": str(root), "data_dir": args.data_dir})
    variables = read_yaml(recipe)["variables"]
    tau, scale = float(variables["sentiment_tau"]), float(variables["brevity_scale"])
    label = next(s for c, s in stages if c == "label")
    fronts = [s for c, s in stages if c == "front"]
    rule, implicit = fronts
    evaluation = rule.evaluation
    prompts = evaluation_prompts(evaluation["prompts"])
    settings = SamplingSettings(**{k: evaluation[k] for k in SamplingSettings.__annotations__ if k in evaluation})
    evaluators = build_evaluators(evaluation["evaluators"])
    reference_model = evaluation["kl_reference"]
    tokenizer = load_tokenizer(str(root / "base"))

    if args.only_morlhf:
        for weights, _, point in morlhf_points(args, root, rule, prompts, settings, evaluators, reference_model,
                                               tokenizer, tau, scale, None):
            print(weights, {o: point[o] for o in OBJECTIVES}, point.get("kl"))
        return
    pairs = {name: str(root / "pairs" / f"pairs_{name}.jsonl") for name in ("sentiment", "brevity")}
    label_cost = sampling_tokens(root / "pairs" / "samples.jsonl", tokenizer)
    ref_pass = {name: preference_pass_tokens(path, tokenizer, True) for name, path in pairs.items()}
    dpo_brevity = root / "dpo_brevity"
    brevity_model_cost = cost(run_tokens(dpo_brevity)) + ref_pass["brevity"]
    prerequisites = {"label_sampling": label_cost, "brevity_dpo": brevity_model_cost,
                     "brevity_margin_pass": 2 * ref_pass["sentiment"]}  # the DPO model and its reference, once

    points, samples = [], {}

    def add(method: str, point: dict, record_file: Path, compute: dict) -> None:
        points.append({**point, "method": method, "compute": compute})
        record = evaluation_record(record_file)
        samples[f"{method}_{point['name']}"] = record["samples"]

    base_file = extra_model_record(Path(rule.output_dir), str(root / "base"))
    base = json.loads(base_file.read_text())["point"]
    add("base", {**base, "weights": None}, base_file, {"per_point": 0})
    for method, front in (("modpo_rule", rule), ("modpo_implicit", implicit)):
        if not (Path(front.output_dir) / "front.json").exists():
            print(f"{front.output_dir}: no front.json (not run yet); {method} left out")
            continue
        for p in json.loads((Path(front.output_dir) / "front.json").read_text())["points"]:
            if p.get("method") != "modpo":
                continue
            folder = Path(front.output_dir) / "points" / p["name"]
            training = cost(run_tokens(folder)) + ref_pass["sentiment"]
            shared = label_cost + (brevity_model_cost + prerequisites["brevity_margin_pass"]
                                   if method == "modpo_implicit" else 0)
            add(method, p, folder, {"per_point": training, "shared": shared})
    sentiment_model = Path(rule.output_dir) / "points" / point_name([1.0, 0.0])
    sentiment_cost = cost(run_tokens(sentiment_model)) + ref_pass["sentiment"]
    modpo_per_point = [p["compute"]["per_point"] for p in points if p["method"] == "modpo_rule"]
    matched = sum(modpo_per_point) / len(modpo_per_point)

    for weights in parse_weights(args.soup_weights):  # soups of the two LoRA models over the shared base
        folder = make_soup([str(sentiment_model), str(dpo_brevity)], weights, root / "soups" / point_name(weights),
                           base=str(root / "base"))
        point = evaluate_model(folder, point_name(weights), weights, prompts, settings, evaluators,
                               kl_reference=reference_model)
        add("soups", point, folder, {"per_point": 0, "shared": label_cost + sentiment_cost + brevity_model_cost})

    for weights, folder, point in morlhf_points(args, root, rule, prompts, settings, evaluators, reference_model,
                                                tokenizer, tau, scale, matched):
        run = json.loads((folder / "modpo_run.json").read_text())
        add("morlhf", point, folder, {"per_point": cost(run["token_counts"]), "shared": 0,
                                      "steps": run["settings"]["steps"], "seconds": run["wall_seconds"]})
    morlhf = MORLHFSettings(**json.loads((folder / "modpo_run.json").read_text())["settings"])

    report(out, points, samples, prerequisites, matched, tau, scale, label, morlhf)


def morlhf_points(args, root: Path, rule, prompts, settings, evaluators, reference_model, tokenizer, tau: float,
                  scale: float, matched: float | None):
    """Train (or reuse) and evaluate MORLHF at each weight; yields (weights, folder, point)."""
    prompt_len = sum(len(encode_prompt(p, tokenizer)) for p in prompts) / len(prompts)
    per_step = 5 * args.prompts_per_step * args.generations * (prompt_len + settings.max_new_tokens * 0.8)
    steps = args.morlhf_steps or max(1, round(matched / per_step))
    train_prompts = list({json.dumps(json.loads(line)["prompt"], sort_keys=True): json.loads(line)["prompt"]
                          for line in (root / "pairs" / "samples.jsonl").read_text().splitlines()}.values())
    rewards = ScorerRewards({"sentiment": {"type": "scorer", "preset": "vader_sentiment"},
                             "brevity": {"type": "length_penalty"}}, {"sentiment": 1 / tau, "brevity": scale})
    morlhf = MORLHFSettings(steps=steps, prompts_per_step=args.prompts_per_step, generations=args.generations,
                            learning_rate=1e-3, beta=0.1, max_completion_length=settings.max_new_tokens, seed=0)
    for weights in parse_weights(args.morlhf_weights):
        folder = train_morlhf(str(root / "base"), rewards, train_prompts, weights, root / "morlhf" / point_name(weights),
                              morlhf, lora=dict(rule.train["lora"]))
        point = evaluate_model(folder, point_name(weights), weights, prompts, settings, evaluators,
                               kl_reference=reference_model)
        yield weights, folder, point


def report(out: Path, points, samples, prerequisites, matched, tau, scale, label, morlhf) -> None:
    means = [[p[o]["mean"] for o in OBJECTIVES] for p in points]
    reference = [min(m[k] for m in means) for k in range(len(OBJECTIVES))]
    everyone = hypervolume(means, reference)
    methods = {}
    for method in dict.fromkeys(p["method"] for p in points):
        mine = [m for m, p in zip(means, points) if p["method"] == method]
        chosen = [p for p in points if p["method"] == method]
        methods[method] = {"hypervolume": hypervolume(mine, reference),
                           "fraction_of_all": hypervolume(mine, reference) / everyone if everyone else math.nan,
                           "non_dominated": [chosen[i]["name"] for i in non_dominated(mine)],
                           "compute_front": sum(p["compute"].get("per_point", 0) for p in chosen)
                           + max((p["compute"].get("shared", 0) for p in chosen), default=0)}
    for p in points:
        if p["weights"]:
            p["true_reward"] = true_reward(p, p["weights"], tau, scale)
    if (out / "samples").exists():
        shutil.rmtree(out / "samples")
    (out / "samples").mkdir(parents=True)
    for name, rows in samples.items():
        (out / "samples" / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    document = {"objectives": OBJECTIVES, "reference_point": reference, "reference_rule": "per-objective minimum "
                "over every evaluated point of every method", "hypervolume_all": everyone, "methods": methods,
                "points": points, "prerequisites_tokens": prerequisites, "modpo_tokens_per_point": matched,
                "morlhf": morlhf.record(), "reward_units": {"sentiment": f"compound / {tau:g}",
                                                            "minus_words": f"{scale:g} x minus words"}}
    (out / "methods.json").write_text(json.dumps(document, indent=2, default=str))
    lines = ["| method | point | sentiment | minus words | KL | w.r | tokens (point) |", "|---|---|---|---|---|---|---|"]
    for p in points:
        kl = p.get("kl", {})
        lines.append(f"| {p['method']} | {p['name']} | {p['sentiment']['mean']:+.3f} ± {p['sentiment']['stderr']:.3f} | "
                     f"{p['minus_words']['mean']:.1f} ± {p['minus_words']['stderr']:.1f} | "
                     f"{kl.get('estimate', math.nan):.2f} ± {kl.get('stderr', math.nan):.2f} | "
                     f"{p.get('true_reward', math.nan):+.2f} | {p['compute'].get('per_point', 0):,} |")
    lines += ["", "| method | hypervolume | fraction of all methods' | front compute (tokens) |", "|---|---|---|---|"]
    for method, m in methods.items():
        lines.append(f"| {method} | {m['hypervolume']:.3f} | {m['fraction_of_all']:.3f} | {m['compute_front']:,} |")
    (out / "methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plots(out, points)


def plots(out: Path, points) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in dict.fromkeys(p["method"] for p in points):
        mine = [p for p in points if p["method"] == method]
        xs, ys = [p["minus_words"]["mean"] for p in mine], [p["sentiment"]["mean"] for p in mine]
        ax.errorbar(xs, ys, xerr=[p["minus_words"]["stderr"] for p in mine],
                    yerr=[p["sentiment"]["stderr"] for p in mine], fmt="o" if method == "base" else "o-",
                    color=COLORS.get(method), label=method, capsize=2)
        for p, x, y in zip(mine, xs, ys):
            if p["weights"]:
                ax.annotate(f"{p['weights'][0]:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("minus words (brevity, exact)")
    ax.set_ylabel("VADER compound (sentiment)")
    ax.set_title("SmolLM2-135M on held-out prompts (labels: w_sentiment)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "front.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = {(0.6, 0.4): "o", (0.3, 0.7): "s", (1.0, 0.0): "^"}
    for p in points:
        if not p["weights"] or "kl" not in p:
            continue
        ax.errorbar(p["kl"]["estimate"], p["true_reward"], xerr=p["kl"]["stderr"], fmt=markers.get(tuple(p["weights"]), "x"),
                    color=COLORS.get(p["method"]), capsize=2)
    for method in dict.fromkeys(p["method"] for p in points if p["weights"]):
        ax.plot([], [], "o", color=COLORS.get(method), label=method)
    for w, m in markers.items():
        ax.plot([], [], m, color="gray", label=f"w = {w}")
    ax.set_xlabel("KL(pi || pi_ref), nats per response, from its samples")
    ax.set_ylabel("w . r at the point's weight (labels' units)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reward_kl.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
