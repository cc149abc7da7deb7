"""The report of `modpo compare`: per method, its front's hypervolume, compute and points, as comparison.md, .json,
.csv and an overlay plot."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from modpo.cache import write_atomic
from modpo.front.report import front_statistics, means, non_dominated, plot_fronts, table

LABELS = {"modpo": "MODPO", "soups": "DPO soups", "dpo_lw": "DPO LW", "bon": "Best-of-N", "morlhf": "MORLHF",
          "conditioned": "MODPO, one conditioned model", "mixing": "Decoding-time mixing"}
REFERENCE_POINT = [0.0, 0.0]


def objectives_of(points: list[dict]) -> tuple[str, ...]:
    return tuple(o for o in points[0] if isinstance(points[0][o], dict) and "mean" in points[0][o])


def summarize_methods(records: dict[str, dict], shared: dict, reference: list[float]) -> dict[str, dict]:
    """Per method: hypervolume, non-dominated points (own front and joint front), own and total compute."""
    objectives = objectives_of(next(iter(records.values()))["points"])
    everything = [(m, p) for m, r in records.items() for p in r["points"]]
    joint = non_dominated(means([p for _, p in everything], objectives))
    joint_names = {(everything[i][0], everything[i][1]["name"]) for i in joint}
    summary = {}
    for method, record in records.items():
        points = record["points"]
        stats = front_statistics(points, objectives, reference)
        own = record["compute"]
        total = {"forward": own["tokens"]["forward"], "backward": own["tokens"]["backward"]}
        wall = own["wall_seconds"]
        for name in record.get("prerequisites", []):
            if name in shared:
                total["forward"] += shared[name]["tokens"]["forward"]
                total["backward"] += shared[name]["tokens"]["backward"]
                wall += shared[name]["wall_seconds"]
        summary[method] = {
            "label": record.get("label", method), "hypervolume": stats["hypervolume"],
            "non_dominated": stats["non_dominated"], "num_points": len(points),
            "on_joint_front": sorted(p["name"] for p in points if (method, p["name"]) in joint_names),
            "wall_seconds": own["wall_seconds"], "device": own.get("device"), "tokens": own["tokens"],
            "prerequisites": record.get("prerequisites", []), "total_tokens": total,
            "total_wall_seconds": round(wall, 2),
            "evaluation_seconds": round(sum(p.get("sampling_seconds", 0) or 0 for p in points), 2),
        }
    return summary


def _fmt_tokens(n: int) -> str:
    return f"{n:,}"


def comparison_markdown(summary: dict, records: dict, shared: dict, meta: dict, objectives, reference) -> str:
    ref = ", ".join(f"{r:g}" for r in reference)
    lines = ["# MODPO and baselines on the synthetic demo task", "",
             f"Weights w = (w_helpful, 1 - w_helpful), w_helpful in {meta['weights']}; every point scored by "
             f"{meta['evaluator']} on {meta['num_prompts']} prompts x {meta['sampling']['samples_per_prompt']} samples "
             f"(temperature {meta['sampling']['temperature']:g}). Hypervolume: reference point [{ref}], objectives "
             f"maximised. Device: {meta['device']}.", "",
             "| method | hypervolume | non-dominated (own front) | on joint front | own wall s | own fwd tokens | "
             "own bwd tokens | prerequisites | total fwd tokens | total bwd tokens | total wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        lines.append(
            f"| {s['label']} | {s['hypervolume']:.4f} | {len(s['non_dominated'])}/{s['num_points']} | "
            f"{len(s['on_joint_front'])}/{s['num_points']} | {s['wall_seconds']:.1f} | {_fmt_tokens(s['tokens']['forward'])} | "
            f"{_fmt_tokens(s['tokens']['backward'])} | {', '.join(s['prerequisites']) or '-'} | "
            f"{_fmt_tokens(s['total_tokens']['forward'])} | {_fmt_tokens(s['total_tokens']['backward'])} | "
            f"{s['total_wall_seconds']:.1f} |")
    if "modpo" in summary:
        base = summary["modpo"]
        cost = lambda s: s["total_tokens"]["forward"] + 2 * s["total_tokens"]["backward"]
        lines += ["", "Total compute relative to MODPO's (tokens as forward + 2 x backward, about proportional to "
                  "FLOPs; and wall seconds): " + "; ".join(
                      f"{s['label']} {cost(s) / max(cost(base), 1):.2f}x tokens, "
                      f"{s['total_wall_seconds'] / max(base['total_wall_seconds'], 1e-9):.2f}x wall"
                      for m, s in summary.items() if m != "modpo") + "."]
    lines += ["", "Totals add the prerequisites each method uses; the SFT model, shared by all, is not in them. "
              "Wall seconds are measured on a shared machine and include waiting for other processes; tokens are "
              "exact counts of non-pad tokens through forward and backward passes, including the passes a cache "
              "saved.", "", "## Shared costs", "", "| component | what | wall s | fwd tokens | bwd tokens |",
              "|---|---|---|---|---|"]
    for name, c in shared.items():
        lines.append(f"| {name} | {c['what']} | {c['wall_seconds']:.1f} | {_fmt_tokens(c['tokens']['forward'])} | "
                     f"{_fmt_tokens(c['tokens']['backward'])} |")
    lines += ["", "## Compute notes", ""]
    for method, record in records.items():
        c = record["compute"]
        detail = ", ".join(f"{k} {_fmt_tokens(v) if isinstance(v, int) else v}" for k, v in c.get("token_detail", {}).items())
        lines.append(f"- {LABELS.get(method, method)}: {c.get('note', '')}" + (f" (tokens: {detail})" if detail else ""))
    if "sft" in meta:
        lines += ["", "Reference: the SFT model scores "
                  + ", ".join(f"{o} {meta['sft'][o]['mean']:.3f} ± {meta['sft'][o]['stderr']:.3f}" for o in objectives) + "."]
    for method, record in records.items():
        lines += ["", f"## {LABELS.get(method, method)}", "",
                  table(record["points"], objectives, summary[method]["non_dominated"])]
    return "\n".join(lines) + "\n"


def write_comparison(folder: Path, records: dict[str, dict], shared: dict, meta: dict,
                     reference: list[float] = REFERENCE_POINT, sft_point: dict | None = None) -> dict:
    """comparison.md, .json, .csv and .png in `folder`; returns the JSON document."""
    folder.mkdir(parents=True, exist_ok=True)
    objectives = objectives_of(next(iter(records.values()))["points"])
    summary = summarize_methods(records, shared, reference)
    if sft_point is not None:
        meta = {**meta, "sft": sft_point}
    document = {"objectives": list(objectives), "reference_point": list(reference), "summary": summary,
                "methods": {m: {"label": r.get("label", m), "points": r["points"], "compute": r["compute"],
                                "prerequisites": r.get("prerequisites", [])} for m, r in records.items()},
                "shared": shared, **meta}
    write_atomic(folder / "comparison.md", lambda tmp: tmp.write_text(
        comparison_markdown(summary, records, shared, meta, objectives, reference)))
    write_atomic(folder / "comparison.json", lambda tmp: tmp.write_text(json.dumps(document, indent=2, default=str)))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "point", "weights", *[f"{o}_{s}" for o in objectives for s in ("mean", "stderr")],
                     "n", "malformed", "non_dominated"])
    for method, record in records.items():
        for p in record["points"]:
            writer.writerow([method, p["name"], " ".join(map(str, p.get("weights") or [])),
                             *[p[o][s] for o in objectives for s in ("mean", "stderr")], p["n"], p["malformed"],
                             p["name"] in summary[method]["non_dominated"]])
    write_atomic(folder / "comparison.csv", lambda tmp: tmp.write_text(out.getvalue()))
    fronts = {LABELS.get(m, m): r["points"] for m, r in records.items()}
    if sft_point is not None:
        fronts["SFT"] = [sft_point]
    plot_fronts(fronts, objectives, folder / "comparison.png", "MODPO and baselines on the synthetic task")
    return document
