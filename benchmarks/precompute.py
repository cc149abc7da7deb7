#!/usr/bin/env python
"""Reference log-prob precompute speed: modpo.logps.batched_sequence_logps (inference mode, longest first), and
batched_pair_logps (prefix sharing: each prompt once).

Times what MODPOTrainer runs once before training (chosen and rejected responses of every row, through the
reference model) on the same synthetic rows and random-weight Qwen2 as `throughput.py`, and reports non-pad
tokens/s and the forward MFU: tokens/s * 2N / peak FLOP/s (N = non-embedding + LM head parameters).

Modes (`--modes`, comma-separated):
  bf16           weights in bf16 (a model loaded with dtype=bf16)
  fp32           fp32 weights, no autocast: what MODPOTrainer's precompute runs when the policy is held in fp32
                 (e.g. bf16 mixed-precision training with fp32 master weights)
  fp32-autocast  fp32 weights under torch.autocast(bf16), as TRL's precompute runs them

    python benchmarks/precompute.py --cpu --out /tmp/p.json
    python benchmarks/precompute.py --shape 0.5b --out pre05b.json
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

GPU_PEAK_TFLOPS = 989.0
CPU_NOMINAL_TFLOPS = 1.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="CPU mode: tiny shape, short sequences, fp32")
    p.add_argument("--shape", choices=sorted(bc.SHAPES), default=None, help="default 0.5b (tiny with --cpu)")
    p.add_argument("--pairs", type=int, default=None, help="preference rows (2 sequences each; default 128, 16 on CPU)")
    p.add_argument("--prompt-len", type=int, default=None, help="mean prompt tokens (default 128; 32 on CPU)")
    p.add_argument("--response-len", type=int, default=None, help="mean response tokens (default 384; 64 on CPU)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward = MODPOConfig.precompute_batch_size (default 16)")
    p.add_argument("--modes", default=None, help="comma-separated: bf16, fp32, fp32-autocast (default: all on GPU, fp32 on CPU)")
    p.add_argument("--layouts", default="padded,prefix_sharing",
                   help="comma-separated: padded (batched_sequence_logps per side), prefix_sharing (batched_pair_logps: "
                        "each prompt once); default both")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the data per mode, median reported (default 3)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU in TFLOP/s (989 on GPU; nominal 1 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 in CPU mode)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None, help="folder for the saved random model (shared with throughput.py)")
    p.add_argument("--out", default=None, help="JSON results file (written atomically)")
    return p


def tokenize(rows, tokenizer, max_length: int):
    from datasets import Dataset

    from modpo.data.formats import tokenize_preferences

    data = tokenize_preferences(Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
                                tokenizer, max_length)
    return tuple([list(ids) for ids in data[name]] for name in ("prompt_ids", "chosen_ids", "rejected_ids"))


def padded_tokens(prompts, responses, batch_size: int) -> int:
    """Tokens including padding under batched_sequence_logps's longest-first batching."""
    lengths = sorted((len(p) + len(r) for p, r in zip(prompts, responses)), reverse=True)
    return sum(len(lengths[i : i + batch_size]) * lengths[i] for i in range(0, len(lengths), batch_size))


def main(argv: list[str] | None = None) -> dict:
    bc.set_offline_env()
    args = build_parser().parse_args(argv)
    import torch

    on_gpu = torch.cuda.is_available() and not args.cpu
    for key, gpu, cpu in (("shape", "0.5b", "tiny"), ("pairs", 128, 16), ("prompt_len", 128, 32),
                          ("response_len", 384, 64), ("modes", "bf16,fp32-autocast,fp32", "fp32"),
                          ("peak_tflops", GPU_PEAK_TFLOPS, CPU_NOMINAL_TFLOPS)):
        if getattr(args, key) is None:
            setattr(args, key, gpu if on_gpu else cpu)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.layout_list = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not args.layout_list or set(args.layout_list) - {"padded", "prefix_sharing"}:
        raise SystemExit(f"--layouts takes padded, prefix_sharing; got {args.layouts!r}")
    if not modes or set(modes) - {"bf16", "fp32", "fp32-autocast"}:
        raise SystemExit(f"--modes takes bf16, fp32, fp32-autocast; got {args.modes!r}")
    threads_before = torch.get_num_threads()
    threads = args.threads if args.threads is not None else (None if on_gpu else 1)
    if threads:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            return _run(args, modes, on_gpu)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, modes, on_gpu) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from modpo.logps import batched_pair_logps, batched_sequence_logps
    from modpo.models import load_tokenizer

    device = torch.device("cuda" if on_gpu else "cpu")
    with tempfile.TemporaryDirectory(prefix="modpo-precompute-") as tmp:
        folder = Path(args.model_dir) if args.model_dir else Path(tmp) / "model"
        save_dtype = torch.float32 if args.shape in ("tiny", "small") else torch.bfloat16
        bc.build_model_dir(args.shape, folder, seed=args.seed, save_dtype=save_dtype, device=device.type)
        tokenizer = load_tokenizer(str(folder / "tokenizer"))
        config = bc.qwen2_config(args.shape)
        rows = bc.synthetic_pairs(args.pairs, args.prompt_len, args.response_len, config.vocab_size, seed=args.seed)
        bc.check_tokenizer(tokenizer, rows)
        max_length = max(1024, bc.max_sequence_length(args.prompt_len, args.response_len))
        prompts, chosen, rejected = tokenize(rows, tokenizer, max_length)
        tokens = sum(len(p) + len(r) for p, r in zip(prompts * 2, chosen + rejected))
        padded = padded_tokens(prompts, chosen, args.batch_size) + padded_tokens(prompts, rejected, args.batch_size)
        pad_id = tokenizer.pad_token_id

        report = {"config": {"shape": args.shape, "pairs": args.pairs, "prompt_len": args.prompt_len,
                             "response_len": args.response_len, "batch_size": args.batch_size,
                             "device": device.type, "peak_tflops": args.peak_tflops, "tokens": tokens,
                             "padded_tokens": padded, **bc.device_info()},
                  "results": {}}
        for mode in modes:
            dtype = torch.bfloat16 if mode == "bf16" else torch.float32
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
            model.eval()
            if "n_flops_params" not in report["config"]:
                report["config"].update(bc.flops_params(model))
            n = report["config"]["n_flops_params"]
            autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if mode == "fp32-autocast"
                        else contextlib.nullcontext())

            def one_pass(layout, limit=None):
                ps, cs, rs = (x[:limit] for x in (prompts, chosen, rejected))
                with autocast:
                    if layout == "prefix_sharing":
                        batched_pair_logps(model, ps, cs, rs, pad_id, args.batch_size)
                    else:
                        for responses in (cs, rs):
                            batched_sequence_logps(model, ps, responses, pad_id, args.batch_size)

            for layout in args.layout_list:
                one_pass(layout, limit=args.batch_size)  # warm-up: CUDA context, kernels, allocator
                times = []
                for _ in range(args.repeats):
                    if on_gpu:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    one_pass(layout)
                    if on_gpu:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                median = statistics.median(times)
                tps = tokens / median
                name = mode if layout == "padded" else f"{mode}+{layout}"
                report["results"][name] = {
                    "layout": layout, "pass_times_s": times, "median_pass_s": median, "tokens_per_s": tps,
                    "forward_mfu": tps * 2 * n / (args.peak_tflops * 1e12),
                    "peak_mem_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
                }
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats()
            del model
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    cfg = report["config"]
    print(f"reference-log-prob precompute, shape {cfg['shape']} (N={cfg['n_flops_params'] / 1e6:.1f}M for 2N), "
          f"{cfg['pairs']} pairs x 2 sequences, batch {cfg['batch_size']}, {tokens} tokens "
          f"({100 * tokens / padded:.1f}% of padded), device {cfg['device']}, peak {cfg['peak_tflops']:g} TFLOP/s\n")
    print("tokens/s counts every sequence's tokens (the prompt twice per pair) in both layouts\n")
    print("| mode | median pass (s) | tokens/s | forward MFU (2N) |")
    print("|---|---:|---:|---:|")
    for mode, r in report["results"].items():
        print(f"| {mode} | {r['median_pass_s']:.4f} | {r['tokens_per_s']:.1f} | {100 * r['forward_mfu']:.2f}% |")
    if args.out:
        bc.write_json_atomic(args.out, report)
        print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
