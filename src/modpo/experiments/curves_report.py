"""The report of the compute-vs-quality curves: per method and learning rate, the fraction of the optimum's
hypervolume against compute over seeds; the chosen learning rate per method; the two claims as numbers;
curves.md, curves.json and the plot curves.png."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path

from modpo.cache import write_atomic
from modpo.experiments.compare_report import LABELS, objectives_of
from modpo.experiments.curve_maths import aggregate, best_index, compute, compute_to_reach, fraction_of_optimum, spread
from modpo.front.report import means, save_figure

THRESHOLD = 0.9
# Claim (a) holds when MODPO's best fraction is at least MORLHF's, up to the spread over seeds of the paired
# difference; claim (b) when MODPO needs at most half MORLHF's compute to reach THRESHOLD (the paper: about 1/3).
RATIO_BOUND = 0.5


def curve_rows(record: dict, seed_info: dict, reference) -> list[dict]:
    """One seed's curve of one method: per budget its own and total compute and its fraction of the optimum."""
    prerequisites = seed_info["prerequisites"]
    rows = []
    for b in record["curve"]:
        objectives = objectives_of(b["points"])
        values = means(b["points"], objectives)
        total = dict(b["tokens"])
        wall = b["wall_seconds"]
        for name in record["prerequisites"]:
            total = {k: total[k] + prerequisites[name]["tokens"][k] for k in total}
            wall += prerequisites[name]["wall_seconds"]
        rows.append({"budget": b["budget"], "unit": b.get("budget_unit", ""), "own_compute": compute(b["tokens"]), "compute": compute(total),
                     "own_wall_seconds": b["wall_seconds"], "wall_seconds": round(wall, 2),
                     "fraction": fraction_of_optimum(values, seed_info["optimal_points"], reference),
                     "tokens": b["tokens"], "total_tokens": total})
    return rows


def summarize_curves(records: list[dict], seeds: dict, meta: dict) -> dict:
    """Per method, per learning rate: the curve over seeds (mean and spread per budget), its best and final
    fraction, the compute to reach THRESHOLD; and the learning rate chosen by best mean final fraction."""
    reference = meta["reference_point"]
    grouped = defaultdict(dict)
    for r in records:
        r = {**r, "prerequisites": meta["prerequisites_of"][r["method"]]}
        grouped[(r["method"], r["learning_rate"])][r["seed"]] = curve_rows(r, seeds[r["seed"]], reference)
    methods = defaultdict(dict)
    for (method, lr), by_seed in grouped.items():
        curves = [by_seed[s] for s in sorted(by_seed)]
        mean_curve = aggregate(curves, ("compute", "own_compute", "wall_seconds", "fraction"))
        ys = [b["fraction"]["mean"] for b in mean_curve]
        best = best_index(ys)
        per_seed_reach = [compute_to_reach([b["compute"] for b in c], [b["fraction"] for b in c], THRESHOLD)
                          for c in curves]
        methods[method][_lr_key(lr)] = {
            "learning_rate": lr, "budgets": [b["budget"] for b in curves[0]], "budget_unit": curves[0][-1]["unit"],
            "curve": mean_curve,
            "per_seed": {s: by_seed[s] for s in sorted(by_seed)},
            "best": {"budget": curves[0][best]["budget"], **mean_curve[best]["fraction"]},
            "best_per_seed": spread([max(b["fraction"] for b in c) for c in curves]),
            "final": mean_curve[-1]["fraction"],
            "compute_to_threshold": compute_to_reach([b["compute"]["mean"] for b in mean_curve], ys, THRESHOLD),
            "threshold_at_first_budget": ys[0] >= THRESHOLD,  # then the compute to it is at most the first budget's
            "own_compute_to_threshold": compute_to_reach([b["own_compute"]["mean"] for b in mean_curve], ys, THRESHOLD),
            "wall_to_threshold": compute_to_reach([b["wall_seconds"]["mean"] for b in mean_curve], ys, THRESHOLD),
            "compute_to_threshold_per_seed": per_seed_reach}
    summary = {}
    for method in [m for m in LABELS if m in methods]:
        grid = methods[method]
        chosen = max(grid, key=lambda k: grid[k]["final"]["mean"])
        summary[method] = {"label": LABELS[method], "chosen_learning_rate": grid[chosen]["learning_rate"],
                           "chosen": grid[chosen], "grid": grid}
    return summary


def _lr_key(lr) -> str:
    return "none" if lr is None else f"{lr:g}"


def claims(summary: dict) -> dict:
    out = {}
    if "modpo" in summary and "morlhf" in summary:
        m, r = summary["modpo"]["chosen"], summary["morlhf"]["chosen"]
        seeds = sorted(set(m["per_seed"]) & set(r["per_seed"]))
        diffs = [max(b["fraction"] for b in m["per_seed"][s]) - max(b["fraction"] for b in r["per_seed"][s])
                 for s in seeds]
        d = spread(diffs)
        out["a"] = {"claim": "MODPO reaches at least the fraction of the optimum MORLHF reaches",
                    "best_fraction": {k: {"mean": v["chosen"]["best"]["mean"], "std": v["chosen"]["best"]["std"]}
                                      for k, v in summary.items()},
                    "modpo_minus_morlhf": d, "holds": d["mean"] >= -d["std"],
                    "rule": "holds when the mean over seeds of (MODPO's best - MORLHF's best) is >= minus its std"}
        cm, cr = m["compute_to_threshold"], r["compute_to_threshold"]
        ratio = cm / cr if cm is not None and cr is not None else None
        per_seed = [a / b for a, b in zip(m["compute_to_threshold_per_seed"], r["compute_to_threshold_per_seed"])
                    if a is not None and b is not None]
        out["b"] = {"claim": f"MODPO needs at most {RATIO_BOUND:g}x MORLHF's compute to reach {THRESHOLD:.0%} of the "
                             "optimum's hypervolume (the paper: about 1/3)",
                    "compute_to_threshold": {k: v["chosen"]["compute_to_threshold"] for k, v in summary.items()},
                    "ratio_modpo_over_morlhf": ratio, "ratio_per_seed": spread(per_seed) if per_seed else None,
                    "holds": (cm is not None and (cr is None or ratio <= RATIO_BOUND)),
                    "rule": "on the seed-mean curves (total tokens fwd + 2 bwd), linear interpolation between budgets; "
                            "holds when MODPO reaches the threshold and MORLHF does not, or the ratio is <= "
                            f"{RATIO_BOUND:g}"}
    return out


def work_seconds(records: list[dict], seeds: dict) -> dict:
    """The wall seconds of the work behind the report, as first done: every run at its largest budget, the SFT
    and DPO prerequisites, and the sampling and scoring of every point (from their records, so a rerun that
    reuses them reports the same)."""
    training = sum(r["curve"][-1]["wall_seconds"] for r in records) + sum(
        info["sft_wall_seconds"] + sum(p["wall_seconds"] for p in info["prerequisites"].values())
        for info in seeds.values())
    evaluation = sum(p.get("sampling_seconds") or 0 for r in records for b in r["curve"] if b["budget"]
                     for p in b["points"])
    return {"training": round(training, 1), "evaluation": round(evaluation, 1)}


def _fmt(x, digits=3) -> str:
    return "not reached" if x is None else (f"{x:,.0f}" if x >= 1000 else f"{x:.{digits}g}")


def curves_markdown(summary: dict, verdicts: dict, meta: dict) -> str:
    s = meta["settings"]
    lines = ["# Compute against quality: MODPO and its baselines on the synthetic demo task", "",
             f"Seeds {s['seeds']}; weights w_helpful in {s['weights']}; every point scored by {meta['evaluator']} "
             f"on {meta['num_prompts']} prompts x {meta['sampling']['samples_per_prompt']} samples. Quality: the "
             "hypervolume of a method's front (reference point [0, 0]) as a fraction of the exact optimum's at the "
             "same weights (under that seed's SFT model). Compute: tokens forward + 2 x backward, totals including "
             f"each method's prerequisites. Device: {meta['device']}. Work behind it: "
             f"{meta['work_seconds']['training']:.0f} s of training and {meta['work_seconds']['evaluation']:.0f} s of "
             f"sampling and scoring (their own records); this invocation took {meta['sweep_wall_seconds']:.0f} s, "
             "reusing what was finished.", "",
             f"Learning-rate grid for every trained method: {s['learning_rates']}; per method the rate with the best "
             "mean final fraction is chosen.", "",
             "| method | chosen lr | best fraction (mean ± std) | min–max over seeds | at budget | final fraction | "
             f"compute to {THRESHOLD:.0%}: total (own) | wall s to {THRESHOLD:.0%} | largest budget: compute, wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, m in summary.items():
        c = m["chosen"]
        lr = "-" if m["chosen_learning_rate"] is None else f"{m['chosen_learning_rate']:g}"
        last = c["curve"][-1]
        first = "≤ " if c["threshold_at_first_budget"] else ""
        lines.append(f"| {m['label']} | {lr} | {c['best']['mean']:.3f} ± {c['best']['std']:.3f} | "
                     f"{c['best']['min']:.3f}–{c['best']['max']:.3f} | {c['best']['budget']} {c['budget_unit']} | "
                     f"{c['final']['mean']:.3f} ± {c['final']['std']:.3f} | {first}{_fmt(c['compute_to_threshold'])} "
                     f"({first}{_fmt(c['own_compute_to_threshold'])}) | "
                     f"{first}{_fmt(c['wall_to_threshold'])} | {last['compute']['mean']:,.0f}, {last['wall_seconds']['mean']:.0f} |")
    lines += ["", "## Every grid point", "", "| method | lr | budgets | fraction per budget (mean ± std) | "
              "total compute per budget (mean) |", "|---|---|---|---|---|"]
    for method, m in summary.items():
        for key, g in m["grid"].items():
            lines.append(f"| {m['label']} | {key} | {g['budgets']} | "
                         + ", ".join(f"{b['fraction']['mean']:.3f} ± {b['fraction']['std']:.3f}" for b in g["curve"])
                         + " | " + ", ".join(f"{b['compute']['mean']:,.0f}" for b in g["curve"]) + " |")
    lines += ["", "## The two claims", ""]
    for name, v in verdicts.items():
        lines.append(f"- ({name}) {v['claim']}: **{'holds' if v['holds'] else 'does not hold'}** ({v['rule']}).")
        if name == "a":
            lines.append("  Best fraction per method: " + ", ".join(
                f"{summary[k]['label']} {b['mean']:.3f} ± {b['std']:.3f}" for k, b in v["best_fraction"].items()) + ".")
            d = v["modpo_minus_morlhf"]
            lines.append(f"  MODPO - MORLHF best fraction: {d['mean']:+.3f} ± {d['std']:.3f} "
                         f"(min {d['min']:+.3f}, max {d['max']:+.3f}).")
        else:
            r = v["ratio_per_seed"]
            lines.append(f"  Ratio MODPO / MORLHF: {_fmt(v['ratio_modpo_over_morlhf'])}"
                         + (f" (per seed {r['min']:.3g}–{r['max']:.3g}, {r['n']} seeds where both reach it)" if r else "")
                         + ".")
    return "\n".join(lines) + "\n"


def plot_curves(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, m in summary.items():
        c = m["chosen"]["curve"]
        xs = [b["compute"]["mean"] for b in c]
        lr = "" if m["chosen_learning_rate"] is None else f", lr {m['chosen_learning_rate']:g}"
        line, = ax.plot(xs, [b["fraction"]["mean"] for b in c], marker="o", label=f"{m['label']}{lr}")
        ax.fill_between(xs, [b["fraction"]["min"] for b in c], [b["fraction"]["max"] for b in c],
                        color=line.get_color(), alpha=0.2)
    ax.axhline(THRESHOLD, color="0.3", linestyle="--", linewidth=1, label=f"{THRESHOLD:.0%} of the optimum")
    ax.set_xscale("log")
    ax.set_xlabel("compute: tokens forward + 2 x backward, incl. prerequisites (log)")
    ax.set_ylabel("hypervolume / optimum's hypervolume")
    ax.set_title("Compute against quality (mean over seeds, band: min-max)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_curves(folder: Path, records: list[dict], seeds: dict, meta: dict) -> dict:
    """curves.md, .json, .csv and the plot curves.png in `folder`; returns the JSON document."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "work_seconds": work_seconds(records, seeds)}
    summary = summarize_curves(records, seeds, meta)
    verdicts = claims(summary)
    document = {"summary": summary, "claims": verdicts, "threshold": THRESHOLD, "seeds": seeds, **meta}
    write_atomic(folder / "curves.md", lambda tmp: tmp.write_text(curves_markdown(summary, verdicts, meta)))
    write_atomic(folder / "curves.json", lambda tmp: tmp.write_text(json.dumps(document, indent=2, default=str)))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "learning_rate", "seed", "budget", "own_compute", "compute", "own_wall_seconds",
                     "wall_seconds", "fraction"])
    for method, m in summary.items():
        for key, g in m["grid"].items():
            for seed, rows in g["per_seed"].items():
                for b in rows:
                    writer.writerow([method, key, seed, b["budget"], b["own_compute"], b["compute"],
                                     b["own_wall_seconds"], b["wall_seconds"], f"{b['fraction']:.6f}"])
    write_atomic(folder / "curves.csv", lambda tmp: tmp.write_text(out.getvalue()))
    plot_curves(summary, folder / "curves.png")
    return document
