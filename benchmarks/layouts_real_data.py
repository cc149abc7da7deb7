#!/usr/bin/env python
"""Batch layouts on a real model and real preference data: MODPOTrainer step time with padded batches,
padding-free packing and prefix sharing, one after the other in one process (same model, rows and order).

The synthetic harness (`throughput.py`) fixes the prompt share of each sequence; real data sets it. QA-Feedback
prompts hold numbered Wikipedia passages (long), PKU-SafeRLHF prompts are one question (short), HH-RLHF
prompts are the dialogue so far. K = 2: objective 0 = the data's pairs, margin = the length penalty.

    .venv/bin/python benchmarks/layouts_real_data.py --model runs/pku_safety/base \\
        --data qa_feedback:../shared/data/qa_feedback_dev_feedback.json --pairs-per-step 4 --steps 6 --lora 8

`--model` is any causal LM folder (here SmolLM2-135M-Instruct, materialised by the recipes' first stage).
Prints a table and, with --out, writes JSON (atomically). Timing as in throughput.py: median step after
`--warmup` steps; tokens/s counts chosen + rejected sequences whatever the layout.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import throughput  # noqa: E402

LAYOUTS = {"padded": {}, "padding_free": {"padding_free": True}, "prefix_sharing": {"prefix_sharing": True}}


def load_rows(spec: str, limit: int):
    """`loader:path`, e.g. qa_feedback:../shared/data/qa_feedback_dev_feedback.json (first `limit` rows)."""
    from modpo.data.loaders import LOADERS

    name, _, path = spec.partition(":")
    if name not in LOADERS or not path:
        raise SystemExit(f"--data wants LOADER:PATH with LOADER one of {sorted(LOADERS)}; got {spec!r}")
    data = LOADERS[name](path)
    return data.select(range(min(limit, len(data)))).select_columns(["prompt", "chosen", "rejected"])


def main(argv=None) -> dict:
    bc.set_offline_env()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="causal LM folder")
    p.add_argument("--data", required=True, help="LOADER:PATH")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated subset of {list(LAYOUTS)}")
    p.add_argument("--pairs-per-step", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--lora", type=int, default=8, help="LoRA rank on attention projections; 0 trains all weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    threads_before = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(args.threads or 1)
    try:
        return _run(args, cuda)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, cuda: bool) -> dict:
    from modpo import MODPOConfig, MODPOTrainer
    from modpo.margins import CallableMargins, length_penalty
    from modpo.models import load_model, load_tokenizer

    rows = load_rows(args.data, args.steps * args.pairs_per_step)
    tokenizer = load_tokenizer(args.model)
    base = load_model(args.model)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    report = {"config": {**vars(args), **bc.device_info()}, "results": {}}
    with tempfile.TemporaryDirectory(prefix="modpo-layouts-") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        for name in [x.strip() for x in args.layouts.split(",") if x.strip()]:
            config = MODPOConfig(output_dir=f"{tmp}/{name}", weights=[0.5, 0.5], max_length=args.max_length,
                                 per_device_train_batch_size=args.pairs_per_step, max_steps=args.steps,
                                 learning_rate=1e-5, lr_scheduler_type="constant", save_strategy="no",
                                 report_to=[], logging_steps=args.steps, seed=0, bf16=cuda, use_cpu=not cuda,
                                 cache_dir=f"{tmp}/cache-{name}", disable_tqdm=True,
                                 **throughput.sequential_kwargs(), **LAYOUTS[name])
            started = time.perf_counter()
            trainer = MODPOTrainer(copy.deepcopy(base), args=config, train_dataset=rows, processing_class=tokenizer,
                                   margin_rewards=[CallableMargins(length_penalty, name="length_penalty")],
                                   peft_config=peft_config)
            init_s = time.perf_counter() - started
            throughput.force_sequential(trainer)
            counter = throughput.CountingCollator(trainer.data_collator)
            trainer.data_collator = counter
            timer = throughput.make_timer(cuda)
            trainer.add_callback(timer)
            trainer.train()
            timed = timer.step_times[args.warmup :]
            tokens = counter.counts[args.warmup : len(timer.step_times)]
            computed = counter.computed[args.warmup : len(timer.step_times)]
            median = statistics.median(timed)
            report["results"][name] = {
                "init_s": init_s, "step_times_s": timer.step_times, "median_step_s": median,
                "tokens_per_step": statistics.mean(tokens), "tokens_computed_per_step": statistics.mean(computed),
                "tokens_per_s": statistics.mean(tokens) / median,
            }
            del trainer
    first = next(iter(report["results"].values()))
    print(f"{args.data}, {args.model}, {args.pairs_per_step} pairs/step, median of {args.steps - args.warmup} steps\n")
    print("| layout | tokens/step | tokens run/step | median step (s) | tokens/s | vs first row |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in report["results"].items():
        print(f"| {name} | {r['tokens_per_step']:.0f} | {r['tokens_computed_per_step']:.0f} | {r['median_step_s']:.3f} | "
              f"{r['tokens_per_s']:.0f} | {first['median_step_s'] / r['median_step_s']:.2f}x |")
    if args.out:
        bc.write_json_atomic(args.out, report)
    return report


if __name__ == "__main__":
    main()
