"""Front statistics and the report folder: table, JSON, CSV, plots.

Every objective is maximised. Hypervolume is the measure of the region dominated by the front and bounded
below by a reference point (stated in the report).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from modpo.cache import write_atomic


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def dominates(a: list[float], b: list[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def non_dominated(points: list[list[float]]) -> list[int]:
    """Indices of the points no other point dominates."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def hypervolume(points: list[list[float]], reference: list[float]) -> float:
    """Exact hypervolume dominated by `points` above `reference` (maximisation), any dimension.

    Slices along the last objective and recurses; fine for the tens of points a front has.
    """
    points = [p for p in points if all(x > r for x, r in zip(p, reference))]
    if not points:
        return 0.0
    if len(reference) == 1:
        return max(p[0] for p in points) - reference[0]
    levels = sorted({p[-1] for p in points}, reverse=True)
    volume = 0.0
    for upper, lower in zip(levels, levels[1:] + [reference[-1]]):
        slab = [p[:-1] for p in points if p[-1] >= upper]
        volume += hypervolume(slab, reference[:-1]) * (upper - lower)
    return volume


def summarize(name: str, weights: list[float], scores, objectives: tuple[str, ...], malformed: int, extra: dict) -> dict:
    """One point of the front: mean and standard error of every objective."""
    point = {"name": name, "weights": weights, "n": int(scores.shape[0]), "malformed": malformed, **extra}
    for k, objective in enumerate(objectives):
        mean, stderr = mean_and_stderr(scores[:, k].tolist())
        point[objective] = {"mean": mean, "stderr": stderr}
    return point


def means(points: list[dict], objectives: tuple[str, ...]) -> list[list[float]]:
    """Each point's mean of every objective, in objective order."""
    return [[p[o]["mean"] for o in objectives] for p in points]


def front_statistics(points: list[dict], objectives: tuple[str, ...], reference: list[float]) -> dict:
    values = means(points, objectives)
    keep = non_dominated(values)
    return {"non_dominated": [points[i]["name"] for i in keep], "hypervolume": hypervolume(values, reference),
            "reference_point": reference}


def optimum_section(points: list[dict], objectives: tuple[str, ...], reference: list[float], optimum,
                    curve_size: int = 41, method: str = "MODPO") -> dict:
    """The front against a known optimum: `optimum(weights)` gives the best value of every objective at a weight
    vector (plain data from whoever knows it, e.g. the demo's exact optimum).

    Per weighted point its optimal point, the gap per objective and the Euclidean distance; the hypervolume of
    the optimal points at the front's weights, and the front's (weighted points only) as a fraction of it; for
    two objectives the optimal curve at `curve_size` weights (w, 1 - w), w from 0 to 1.
    """
    weighted = [p for p in points if p.get("weights") is not None]
    rows = []
    for p in weighted:
        best, got = list(optimum(p["weights"])), [p[o]["mean"] for o in objectives]
        rows.append({"name": p["name"], "weights": p["weights"], "optimum": dict(zip(objectives, best)),
                     "gap": {o: b - g for o, b, g in zip(objectives, best, got)},
                     "distance": math.dist(best, got)})
    best_volume = hypervolume([list(r["optimum"].values()) for r in rows], reference)
    volume = hypervolume(means(weighted, objectives), reference)
    curve = []
    if len(objectives) == 2:
        for i in range(curve_size):
            w = [i / (curve_size - 1), 1 - i / (curve_size - 1)]
            curve.append({"weights": w, **dict(zip(objectives, optimum(w)))})
    describe = getattr(optimum, "describe", None)
    return {"description": describe() if describe else "given optimum", "points": rows,
            "hypervolume": best_volume, "reference_point": reference,
            "fronts": {method: {"hypervolume": volume, "fraction": volume / best_volume if best_volume else None}},
            "curve": curve}


def against_per_weight(points: list[dict], conditioned: list[dict], objectives: tuple[str, ...],
                       reference: list[float]) -> dict | None:
    """The conditioned model at the per-weight front's own weight vectors: its hypervolume there as a fraction of
    the separately trained models', and its training tokens (forward + backward) as a fraction of theirs."""
    trained = [p for p in points if p.get("weights") is not None]
    same = [c for c in conditioned if any(c["weights"] == p["weights"] for p in trained)]
    if not trained or len(same) != len(trained):
        return None
    mine, theirs = (hypervolume(means(group, objectives), reference) for group in (same, trained))
    total = lambda counts: counts["forward"] + counts["backward"]
    spent = [p.get("token_counts") for p in trained]
    tokens = (total(conditioned[0]["token_counts"]) / sum(map(total, spent))
              if conditioned[0].get("token_counts") and all(spent) else None)
    return {"weights": len(trained), "hypervolume": mine, "per_weight_hypervolume": theirs,
            "fraction": mine / theirs if theirs else None, "token_fraction": tokens}


def optimum_table(section: dict, objectives: tuple[str, ...]) -> str:
    rows = [f"| point | {' | '.join(f'optimal {o} (gap)' for o in objectives)} | distance |",
            "|" + "---|" * (len(objectives) + 2)]
    for r in section["points"]:
        cells = [f"{r['optimum'][o]:.3f} ({r['gap'][o]:+.3f})" for o in objectives]
        rows.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['distance']:.3f} |")
    (method, front), = section["fronts"].items()
    fraction = f" ({100 * front['fraction']:.0f}% of it)" if front["fraction"] is not None else ""
    return ("\n".join(rows) + f"\n\nOptimum: {section['description']}. Its hypervolume at the front's weights is "
            f"{section['hypervolume']:.4f}; the {method} points' {front['hypervolume']:.4f}{fraction}.\n")


def checks_table(checks: list[dict]) -> str:
    """The evaluators' held-out pairwise accuracies, each against its floor."""
    rows = ["| evaluator | held-out pairs | pairwise accuracy | floor | usable |", "|---|---|---|---|---|"]
    for c in checks:
        rows.append(f"| {c['objective']} ({c['evaluator']}) | {c['pairs']} | {c['accuracy']:.3f} ± {c['stderr']:.3f} | "
                    f"{c['floor']:g} | {'yes' if c['usable'] else '**no**: its column does not rank the points'} |")
    return "\n".join(rows)


def table(points: list[dict], objectives: tuple[str, ...], non_dominated_names: list[str]) -> str:
    """A markdown table: one row per point, mean ± standard error per objective."""
    head = "| point | weights | " + " | ".join(objectives) + " | non-dominated |"
    rows = [head, "|" + "---|" * (len(objectives) + 3)]
    for p in points:
        cells = [f"{p[o]['mean']:.3f} ± {p[o]['stderr']:.3f}" for o in objectives]
        weights = "(" + ", ".join(f"{w:g}" for w in p["weights"]) + ")" if p.get("weights") is not None else "-"
        rows.append(f"| {p['name']} | {weights} | " + " | ".join(cells) +
                    f" | {'yes' if p['name'] in non_dominated_names else ''} |")
    return "\n".join(rows)


def plot_fronts(fronts: dict[str, list[dict]], objectives: tuple[str, ...], path: Path, title: str,
                optimum: dict | None = None) -> None:
    """Scatter of the first two objectives, one series per method, points labelled by weights; with an
    `optimum_section`, its curve and its optimal point at each weight vector of the front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    if len(objectives) == 1:  # one objective: a value per point, in sweep order
        for method, points in fronts.items():
            ax.errorbar(range(len(points)), [p[objectives[0]]["mean"] for p in points],
                        yerr=[p[objectives[0]]["stderr"] for p in points], marker="o", capsize=2, label=method)
            ax.set_xticks(range(len(points)), [p["name"] for p in points], rotation=30, fontsize=7)
        objectives = ("point", objectives[0])
    x_name, y_name = objectives[0], objectives[1]
    for method, points in (fronts.items() if x_name != "point" else ()):
        xs = [p[x_name]["mean"] for p in points]
        ys = [p[y_name]["mean"] for p in points]
        ax.errorbar(xs, ys, xerr=[p[x_name]["stderr"] for p in points], yerr=[p[y_name]["stderr"] for p in points],
                    marker="o", linestyle="-" if len(fronts) > 1 else "none", capsize=2, label=method)
        if len(fronts) == 1:
            for p, x, y in zip(points, xs, ys):  # weight vectors, or the name of a reference model (e.g. sft)
                label = "w=" + ",".join(f"{w:g}" for w in p["weights"]) if p.get("weights") is not None else p["name"]
                ax.annotate(label, (x, y), fontsize=7, textcoords="offset points", xytext=(4, 4))
    if optimum and optimum.get("curve") and x_name != "point":
        ax.plot([c[x_name] for c in optimum["curve"]], [c[y_name] for c in optimum["curve"]], color="0.5",
                linewidth=1, label="exact optimum")
        ax.scatter([r["optimum"][x_name] for r in optimum["points"]], [r["optimum"][y_name] for r in optimum["points"]],
                   marker="x", color="0.3", zorder=3, label="optimum at the front's weights")
    ax.set_xlabel(f"{x_name} (higher is better)")
    ax.set_ylabel(f"{y_name} (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Lay out `fig`, write it as a PNG to `path` (atomically) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def write_report(folder: Path, points: list[dict], objectives: tuple[str, ...], reference: list[float],
                 meta: dict, title: str = "MODPO front", optimum=None) -> dict:
    """front.md, front.json, front.csv and front.png in `folder`; returns the JSON document. With `optimum` (a
    callable: weights -> best value per objective), the document gains an `optimum` section."""
    folder.mkdir(parents=True, exist_ok=True)
    # The per-weight MODPO front (and any extra models) as before; a weight-conditioned model's points (`method`
    # "conditioned") are their own front, reported beside it under `methods`.
    conditioned = [p for p in points if p.get("method") == "conditioned"]
    points = [p for p in points if p.get("method") != "conditioned"]
    stats = front_statistics(points, objectives, reference)
    section = optimum_section(points, objectives, reference, optimum) if optimum is not None else None
    document = {"objectives": list(objectives), "points": points + conditioned, **stats, **meta}
    if section is not None:
        document["optimum"] = section
    if conditioned:
        document["methods"] = {"modpo": {k: stats[k] for k in ("hypervolume", "non_dominated")},
                               "conditioned": {**front_statistics(conditioned, objectives, reference),
                                               "against_per_weight": against_per_weight(points, conditioned,
                                                                                        objectives, reference)}}
        if optimum is not None:
            document["methods"]["conditioned"]["optimum"] = optimum_section(conditioned, objectives, reference, optimum,
                                                                              method="conditioned model")
    text = table(points, objectives, stats["non_dominated"])
    summary = (f"{text}\n\nHypervolume {stats['hypervolume']:.4f} (reference point "
               f"{', '.join(f'{r:g}' for r in reference)}; objectives maximised).\n")
    if meta.get("evaluators"):
        summary += f"Evaluators: {'; '.join(meta['evaluators'])}.\n"
    if meta.get("evaluator_checks"):
        summary += "\n" + checks_table(meta["evaluator_checks"]) + "\n"
    if meta.get("training_margin_sources"):
        summary += f"Training margin sources (not used for evaluation): {json.dumps(meta['training_margin_sources'])}.\n"
    if section is not None:
        summary += "\n" + optimum_table(section, objectives)
    if conditioned:
        c = document["methods"]["conditioned"]
        summary += (f"\nOne weight-conditioned model, trained once, at {len(conditioned)} weight vectors:\n\n"
                    f"{table(conditioned, objectives, c['non_dominated'])}\n\nHypervolume {c['hypervolume']:.4f} "
                    f"(the per-weight MODPO front: {stats['hypervolume']:.4f}).\n")
        a = c["against_per_weight"]
        if a and a["fraction"] is not None:
            tokens = (f", on {100 * a['token_fraction']:.0f}% of their training tokens" if a["token_fraction"] is not None
                      else "")
            summary += (f"At the per-weight front's {a['weights']} weight vectors its hypervolume is "
                        f"{a['hypervolume']:.4f}: {100 * a['fraction']:.1f}% of the {a['weights']} separately trained "
                        f"models'{tokens}.\n")
        if "optimum" in c:
            summary += "\n" + optimum_table(c["optimum"], objectives)
    write_atomic(folder / "front.md", lambda tmp: tmp.write_text(summary))
    write_atomic(folder / "front.json", lambda tmp: tmp.write_text(json.dumps(document, indent=2, default=str)))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["point", "weights", *[f"{o}_{s}" for o in objectives for s in ("mean", "stderr")], "n", "malformed"])
    for p in points + conditioned:
        writer.writerow([p["name"], " ".join(map(str, p.get("weights") or [])),
                         *[p[o][s] for o in objectives for s in ("mean", "stderr")], p["n"], p["malformed"]])
    write_atomic(folder / "front.csv", lambda tmp: tmp.write_text(out.getvalue()))
    fronts = {"MODPO": points, **({"MODPO, one conditioned model": conditioned} if conditioned else {})}
    plot_fronts(fronts, objectives, folder / "front.png", title, section)
    return document
