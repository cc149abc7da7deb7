#!/usr/bin/env python
"""Markdown tables from benchmark JSON files (throughput.py and precompute.py reports).

    python benchmarks/summarize.py results/*.json
    python benchmarks/summarize.py results/*.json --bundle all.json   # also merge them into one JSON file
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def levers(cfg: dict, settings: dict, overrides: dict | None = None) -> str:
    parts = [cfg.get("dtype", "?"), f"optim={settings.get('optim', cfg.get('optim'))}"]
    if "chunked_logps" in settings:
        parts.append(f"chunked={settings['chunked_logps']}")
    if cfg.get("gradient_checkpointing"):
        parts.append("grad-ckpt")
    if cfg.get("torch_compile"):
        parts.append("compile")
    for key, value in (overrides if overrides is not None else cfg.get("modpo_overrides") or {}).items():
        if key != "chunked_logps":
            parts.append(f"{key}={value}")
    return " ".join(parts)


def throughput_rows(name: str, report: dict) -> list[str]:
    cfg = report["config"]
    rows = []
    for side, r in report["results"].items():
        run = report.get("label") or name
        if "error" in r:
            rows.append(f"| {run} | {cfg['shape']} | {side} | error: {r['error'].strip().splitlines()[-1][:60]} | | | | | |")
            continue
        mem = r["peak_mem_bytes"] / 2**30 if cfg.get("device") == "cuda" else None
        overrides = {} if side == "trl" else r.get("modpo_overrides")
        rows.append(f"| {run} | {cfg['shape']} | {side} | {levers(cfg, r.get('settings', {}), overrides)} | "
                    f"{r['median_step_s']:.4f} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
                    f"{bc.fmt(mem, '.2f')} | {r['init_s']:.1f} |")
    for side, ratios in {"modpo": report.get("ratios"), **report.get("variant_ratios", {})}.items():
        if ratios:
            rows.append(f"| {report.get('label') or name} | {cfg['shape']} | **{side}/trl** | | "
                        f"{bc.fmt(ratios.get('median_step_s'))} | {bc.fmt(ratios.get('tokens_per_s'))} | "
                        f"{bc.fmt(ratios.get('mfu'))} | {bc.fmt(ratios.get('peak_mem'))} | |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--bundle", default=None, help="also write all reports into this one JSON file")
    args = p.parse_args(argv)
    reports = {}
    for f in args.files:
        try:
            reports[Path(f).stem] = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"skipping {f}: {err}", file=sys.stderr)
    train = {k: v for k, v in reports.items() if "ratios" in v}
    pre = {k: v for k, v in reports.items() if "ratios" not in v and "results" in v}
    if train:
        first = next(iter(train.values()))["config"]
        print(f"Training throughput ({first.get('cuda_device') or first.get('device')}, peak "
              f"{first.get('peak_tflops')} TFLOP/s for MFU, 6N FLOPs/token):\n")
        print("| run | shape | trainer | levers | median step (s) | tokens/s | MFU | peak mem (GiB) | init (s) |")
        print("|---|---|---|---|---:|---:|---:|---:|---:|")
        for name, report in train.items():
            print("\n".join(throughput_rows(name, report)))
    if pre:
        print("\nReference log-prob precompute (modpo.logps.batched_sequence_logps, 2N FLOPs/token):\n")
        print("| run | shape | mode | batch | median pass (s) | tokens/s | forward MFU |")
        print("|---|---|---|---:|---:|---:|---:|")
        for name, report in pre.items():
            cfg = report["config"]
            for mode, r in report["results"].items():
                print(f"| {name} | {cfg['shape']} | {mode} | {cfg['batch_size']} | {r['median_pass_s']:.4f} | "
                      f"{r['tokens_per_s']:.0f} | {100 * r['forward_mfu']:.1f}% |")
    if args.bundle:
        bc.write_json_atomic(args.bundle, reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
