#!/usr/bin/env python
"""Training throughput: modpo's MODPOTrainer (K=2) against TRL's DPOTrainer, same model, data and hardware.

One run trains (a) MODPOTrainer with weights [0.6, 0.4] and margins as data columns, and (b) trl.DPOTrainer with
precomputed reference log-probs, on the same random-weight Qwen2 (loaded from one `save_pretrained` folder), the
same synthetic rows in the same order (sequential sampler, one pass), the same batch size, max_length, optimizer,
learning rate, precision and gradient-checkpointing setting. For each it reports

* tokens/s: non-pad tokens of the chosen + rejected sequences (prompt included) per optimizer step, averaged over
  the timed steps, divided by the median wall time of the timed steps (steps after `--warmup`);
* MFU: tokens/s * 6N / peak FLOP/s, N = non-embedding parameters + LM head parameters;
* peak device memory (torch.cuda.max_memory_allocated during training; on CPU the process's peak RSS);

and the ratios modpo/trl. Output: a markdown table on stdout and a JSON file (`--out`), written atomically.

    python benchmarks/throughput.py --cpu --out /tmp/b.json          # tiny model, CPU, seconds
    python benchmarks/throughput.py --shape 0.5b --out 05b.json       # one GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

SIDES = ("modpo", "trl")
MODPO_WEIGHTS = [0.6, 0.4]
GPU_PEAK_TFLOPS = 989.0  # H100 SXM bf16 dense
CPU_NOMINAL_TFLOPS = 1.0  # nominal: CPU MFU is only a relative number
CPU_PRESET = dict(shape="tiny", prompt_len=32, response_len=64, pairs_per_step=4, steps=6, warmup=2)
GPU_PRESET = dict(shape="0.5b", prompt_len=128, response_len=384, pairs_per_step=8, steps=12, warmup=4)


def parse_value(text: str):
    """`--modpo-set` values: JSON (numbers, lists, true/false/null, quoted strings), True/False, else a string."""
    if text in ("True", "False"):
        return text == "True"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="CPU mode: tiny shape, few steps, fp32 (presets unless given)")
    p.add_argument("--shape", choices=sorted(bc.SHAPES), default=None, help="model shape (default 0.5b; tiny with --cpu)")
    p.add_argument("--which", default="modpo,trl", help="comma-separated sides to run: modpo, trl (default both)")
    p.add_argument("--prompt-len", type=int, default=None, help="mean prompt tokens, +-10%% (default 128; 32 on CPU)")
    p.add_argument("--response-len", type=int, default=None, help="mean tokens per response, +-10%% (default 384; 64 on CPU)")
    p.add_argument("--pairs-per-step", type=int, default=None, help="preference pairs per optimizer step (default 8; 4 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per trainer; rows = steps * pairs (default 12; 6 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out of the timing, >= 1 (default 4; 2 on CPU)")
    p.add_argument("--max-length", type=int, default=None, help="max tokens of prompt+response (default: no truncation)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="training precision: bf16 = TrainingArguments.bf16 mixed precision (default on GPU); fp32 on CPU")
    p.add_argument("--weights-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dtype the weights are loaded in (fp32 master weights; bf16 = pure bf16 training)")
    p.add_argument("--optim", default="adamw_torch", help="TrainingArguments.optim, both sides (default adamw_torch; e.g. adamw_torch_fused)")
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate, both sides (default 1e-6)")
    p.add_argument("--beta", type=float, default=0.1, help="beta, both sides (default 0.1)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="gradient checkpointing, both sides (TRL's own default is on; here off unless asked)")
    p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=False,
                   help="TrainingArguments.torch_compile, both sides (default off)")
    p.add_argument("--modpo-chunked-logps", action=argparse.BooleanOptionalAction, default=None,
                   help="MODPOConfig.chunked_logps (default: MODPOConfig's default)")
    p.add_argument("--modpo-set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any MODPOConfig field (repeatable), e.g. --modpo-set padding_free=true")
    p.add_argument("--modpo-variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="one more modpo side in the same run, named modpo[NAME], with these MODPOConfig fields on top "
                        "of --modpo-set (repeatable), e.g. --modpo-variant shared:prefix_sharing=true; each gets its "
                        "own ratios to TRL")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak FLOP/s for MFU, in TFLOP/s (default {GPU_PEAK_TFLOPS:g} on GPU = H100 bf16 dense; "
                        f"nominal {CPU_NOMINAL_TFLOPS:g} on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 in CPU mode: OpenMP on a shared, busy machine is far slower "
                        "with 2 threads than with 1; unchanged on GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data and trainers (default 0)")
    p.add_argument("--model-dir", default=None, help="folder for the saved random model (reused if it holds the shape)")
    p.add_argument("--work-dir", default=None, help="folder for trainer outputs and caches (default: a temp folder)")
    p.add_argument("--profile", action="store_true",
                   help="profile the first step after warm-up with torch.profiler; print the top ops by device time")
    p.add_argument("--label", default="", help="free-text label stored in the JSON")
    p.add_argument("--out", default=None, help="JSON results file (written atomically)")
    return p


def resolve_args(args: argparse.Namespace, cuda: bool) -> argparse.Namespace:
    args.on_gpu = cuda and not args.cpu
    for key, value in (GPU_PRESET if args.on_gpu else CPU_PRESET).items():  # explicit flags win
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype is None:
        args.dtype = "bf16" if args.on_gpu else "fp32"
    if args.peak_tflops is None:
        args.peak_tflops = GPU_PEAK_TFLOPS if args.on_gpu else CPU_NOMINAL_TFLOPS
        args.peak_tflops_source = "default H100 bf16 dense" if args.on_gpu else "nominal (CPU)"
    else:
        args.peak_tflops_source = "--peak-tflops"
    if args.max_length is None:
        args.max_length = max(1024, bc.max_sequence_length(args.prompt_len, args.response_len))
    if args.warmup < 1 or args.steps <= args.warmup:
        raise SystemExit(f"need 1 <= --warmup < --steps (got warmup={args.warmup}, steps={args.steps})")
    args.sides = [s.strip() for s in args.which.split(",") if s.strip()]
    unknown = set(args.sides) - set(SIDES)
    if unknown or not args.sides:
        raise SystemExit(f"--which takes a comma-separated subset of {SIDES}, got {args.which!r}")
    args.modpo_overrides = {}
    for item in args.modpo_set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--modpo-set wants KEY=VALUE, got {item!r}")
        args.modpo_overrides[key.strip()] = parse_value(value.strip())
    if args.modpo_chunked_logps is not None:
        args.modpo_overrides.setdefault("chunked_logps", args.modpo_chunked_logps)
    args.variants = {"modpo": dict(args.modpo_overrides)} if "modpo" in args.sides else {}
    for item in args.modpo_variant:
        name, sep, settings = item.partition(":")
        pairs = [part.partition("=") for part in settings.split(",") if part.strip()]
        if not sep or not name.strip() or not pairs or any(not eq for _, eq, _ in pairs):
            raise SystemExit(f"--modpo-variant wants NAME:KEY=VALUE[,KEY=VALUE], got {item!r}")
        side = f"modpo[{name.strip()}]"
        if side in args.variants:
            raise SystemExit(f"--modpo-variant: {name.strip()!r} given twice")
        args.variants[side] = {**args.modpo_overrides, **{k.strip(): parse_value(v.strip()) for k, _, v in pairs}}
    # modpo sides first, in the order given, then TRL
    args.sides = list(args.variants) + [s for s in args.sides if s != "modpo"]
    return args


def common_training_kwargs(args, out_dir: Path) -> dict:
    """TrainingArguments shared by both sides, every TRL default that differs from transformers' set explicitly."""
    return dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.pairs_per_step,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        num_train_epochs=1,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim=args.optim,
        bf16=args.dtype == "bf16",
        fp16=False,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        torch_compile=args.torch_compile,
        dataloader_num_workers=0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=not args.on_gpu,
        max_length=args.max_length,
        beta=args.beta,
        **sequential_kwargs(),
    )


def sequential_kwargs() -> dict:
    """No shuffling: both trainers see the rows in dataset order (field exists in recent transformers only)."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"train_sampling_strategy": "sequential"} if "train_sampling_strategy" in names else {}


def force_sequential(trainer) -> None:
    """Fallback for transformers without `train_sampling_strategy`: a per-instance sequential sampler."""
    if not sequential_kwargs():
        from torch.utils.data import SequentialSampler

        trainer._get_train_sampler = lambda *args, **kwargs: SequentialSampler(trainer.train_dataset)


class CountingCollator:
    """Wraps a trainer's collator and records, per batch, the non-pad tokens of its chosen + rejected sequences
    (`counts`) and the tokens the model actually runs on (`computed`: fewer with prefix sharing, where each
    prompt runs once)."""

    def __init__(self, inner):
        self.inner = inner
        self.counts: list[int] = []
        self.computed: list[int] = []

    def __call__(self, features):
        batch = self.inner(features)
        layout = batch.get("layout", batch)  # modpo's batch keeps the model's inputs in its layout
        if "attention_mask" in layout:
            computed = int(layout["attention_mask"].sum())
        else:  # modpo packed: sequences 0..2B-1 are real, a trailing filler (if any) is not
            computed = int((layout["sequence_index"] < 2 * len(features)).sum())
        if "prompt_ids" in features[0]:  # modpo's features: count the sequences whatever the layout
            self.counts.append(sum(2 * len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"])
                                   for f in features))
        else:
            self.counts.append(computed)
        self.computed.append(computed)
        return batch


def make_timer(cuda: bool):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time per optimizer step: between consecutive on_step_end calls (data loading included)."""

        def __init__(self):
            self.step_times: list[float] = []
            self._last = None

        def _now(self) -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self._last = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            now = self._now()
            self.step_times.append(now - self._last)
            self._last = now

    return StepTimer()


def make_profiler(cuda: bool, warmup: int, side: str):
    """Profiles one optimizer step (the first after warm-up) and prints the ops that took the most time."""
    import torch
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        def __init__(self):
            self.profiler = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if cuda:
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is not None:
                if cuda:
                    torch.cuda.synchronize()
                self.profiler.__exit__(None, None, None)
                key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
                print(f"--- profile of one {side} step (top ops by {key})")
                print(self.profiler.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=60))
                self.profiler = None

    return StepProfiler()


def load_policy(folder: Path, weights_dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=weights_dtype, attn_implementation="sdpa")


def build_modpo(args, folder, rows, work: Path, weights_dtype, overrides: dict):
    from datasets import Dataset

    from modpo import MODPOConfig, MODPOTrainer
    from modpo.models import load_tokenizer

    field_names = {f.name for f in dataclasses.fields(MODPOConfig)}
    unknown = sorted(set(overrides) - field_names)
    if unknown:
        raise ValueError(f"--modpo-set/--modpo-variant: MODPOConfig has no field(s) {unknown}")
    kwargs = common_training_kwargs(args, work / "modpo-out")
    kwargs.update(weights=MODPO_WEIGHTS, loss_type="sigmoid", precompute_batch_size=2 * args.pairs_per_step,
                  cache_dir=str(work / "modpo-cache"))
    kwargs.update(overrides)
    config = MODPOConfig(**kwargs)
    tokenizer = load_tokenizer(str(folder / "tokenizer"))
    bc.check_tokenizer(tokenizer, rows)
    model = load_policy(folder, weights_dtype)
    dataset = Dataset.from_list(rows)
    trainer = MODPOTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer)
    settings = {name: getattr(config, name) for name in ("chunked_logps", "weights", *sorted(overrides))}
    return trainer, settings


def build_trl(args, folder, rows, work: Path, weights_dtype, overrides=None):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    kwargs = common_training_kwargs(args, work / "trl-out")
    kwargs.update(
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=args.pairs_per_step,  # sequences per forward = modpo's precompute_batch_size
        loss_type=["sigmoid"],
        label_smoothing=0.0,
        model_init_kwargs={"dtype": weights_dtype, "attn_implementation": "sdpa", "device_map": None},
        disable_dropout=True,
        truncation_mode="keep_start",
        padding_free=False,
        use_weighting=False,
        activation_offloading=False,
        use_liger_kernel=False,
        remove_unused_columns=True,
    )
    config = DPOConfig(**kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    bc.check_tokenizer(tokenizer, rows)
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trainer = DPOTrainer(str(folder), args=config, train_dataset=dataset, processing_class=tokenizer)
    return trainer, {"precompute_ref_log_probs": True, "loss_type": ["sigmoid"]}


def run_side(side: str, args, folder: Path, rows, work: Path, weights_dtype, n_flops: int, expected: list[int]):
    import torch

    cuda = args.on_gpu
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    start = time.perf_counter()
    builder = build_trl if side == "trl" else build_modpo
    trainer, settings = builder(args, folder, rows, work / side.replace("[", "-").rstrip("]"), weights_dtype,
                                args.variants.get(side))
    init_s = time.perf_counter() - start
    force_sequential(trainer)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    timer = make_timer(cuda)
    trainer.add_callback(timer)
    if getattr(args, "profile", False):
        trainer.add_callback(make_profiler(cuda, args.warmup, side))
    model = trainer.model
    effective = {
        "attn_implementation": model.config._attn_implementation,
        "param_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "bf16": trainer.args.bf16,
        "optim": getattr(trainer.args.optim, "value", str(trainer.args.optim)),
        "gradient_checkpointing": trainer.args.gradient_checkpointing,
        "torch_compile": trainer.args.torch_compile,
        "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
        "max_length": trainer.args.max_length,
        "learning_rate": trainer.args.learning_rate,
        **settings,
    }
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mem_before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    output = trainer.train()
    train_s = time.perf_counter() - start

    times = timer.step_times
    counts = counter.counts[: len(times)]
    if len(times) != args.steps or len(counts) != args.steps:
        raise RuntimeError(f"{side}: expected {args.steps} steps, timed {len(times)}, counted {len(counter.counts)} batches")
    timed, timed_counts = times[args.warmup :], counts[args.warmup :]
    median_s = statistics.median(timed)
    tokens_step = sum(timed_counts) / len(timed_counts)
    tokens_per_s = tokens_step / median_s
    mfu = tokens_per_s * 6 * n_flops / (args.peak_tflops * 1e12)
    if cuda:
        peak_mem, mem_kind = torch.cuda.max_memory_allocated(), "cuda.max_memory_allocated (training)"
        extra_mem = {"mem_before_train_bytes": mem_before, "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    else:
        peak_mem, mem_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss (process, cumulative)"
        extra_mem = {}
    result = {
        "init_s": init_s,
        "train_s": train_s,
        "step_times_s": times,
        "median_step_s": median_s,
        "tokens_per_step": counts,
        "tokens_computed_per_step": counter.computed[: len(times)],
        "tokens_per_step_timed_mean": tokens_step,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_mean": sum(timed_counts) / sum(timed),
        "mfu": mfu,
        "peak_mem_bytes": peak_mem,
        "peak_mem_kind": mem_kind,
        **extra_mem,
        "tokens_match_expected": counts == expected,
        "train_loss": getattr(output, "training_loss", None),
        "settings": effective,
        **({"modpo_overrides": args.variants[side]} if side in args.variants else {}),
    }
    del trainer, model, output
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def markdown_table(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"shape {cfg['shape']} (N={cfg['n_flops_params'] / 1e6:.1f}M for 6N), {cfg['pairs_per_step']} pairs/step, "
        f"prompt~{cfg['prompt_len']} response~{cfg['response_len']}, {cfg['dtype']} (weights {cfg['weights_dtype']}), "
        f"optim {cfg['optim']}, grad-ckpt {cfg['gradient_checkpointing']}, compile {cfg['torch_compile']}, "
        f"{cfg['steps']} steps ({cfg['warmup']} warm-up), device {cfg['device']}, "
        f"peak {cfg['peak_tflops']:g} TFLOP/s ({cfg['peak_tflops_source']})",
        "",
        "| trainer | tokens/step | median step (s) | tokens/s | MFU | peak mem (MiB) | init (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for side, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {side} | error: {r['error'].splitlines()[-1][:80]} | | | | | |")
            continue
        lines.append(f"| {side} | {r['tokens_per_step_timed_mean']:.0f} | {r['median_step_s']:.4f} | "
                     f"{r['tokens_per_s']:.1f} | {100 * r['mfu']:.2f}% | {r['peak_mem_bytes'] / 2**20:.0f} | "
                     f"{r['init_s']:.1f} |")
    all_ratios = {"modpo": report["ratios"], **report.get("variant_ratios", {})}
    for side, rt in all_ratios.items():
        if rt:
            lines.append(f"| {side}/trl | | {bc.fmt(rt.get('median_step_s'))} | {bc.fmt(rt.get('tokens_per_s'))} | "
                         f"{bc.fmt(rt.get('mfu'))} | {bc.fmt(rt.get('peak_mem'))} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the report (also printed as a table and, with --out, written as JSON)."""
    bc.set_offline_env()
    args = build_parser().parse_args(argv)
    import torch

    args = resolve_args(args, torch.cuda.is_available())
    threads_before = torch.get_num_threads()
    threads = args.threads if args.threads is not None else (None if args.on_gpu else 1)
    if threads:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5.2x renames, TRL deprecations
            return _run(args, argv)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, argv) -> dict:
    import torch

    weights_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.weights_dtype]
    with tempfile.TemporaryDirectory(prefix="modpo-bench-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp) / "work"
        folder = Path(args.model_dir) if args.model_dir else Path(tmp) / "model"
        save_dtype = torch.float32 if args.shape in ("tiny", "small") else torch.bfloat16
        start = time.perf_counter()
        bc.build_model_dir(args.shape, folder, seed=args.seed, save_dtype=save_dtype,
                           device="cuda" if args.on_gpu else "cpu")
        build_s = time.perf_counter() - start
        config = bc.qwen2_config(args.shape)
        from transformers import Qwen2ForCausalLM

        with torch.device("meta"):
            counts = bc.flops_params(Qwen2ForCausalLM(config))
        rows = bc.synthetic_pairs(args.steps * args.pairs_per_step, args.prompt_len, args.response_len,
                                  config.vocab_size, seed=args.seed)
        expected = bc.tokens_per_step(rows, args.pairs_per_step, args.max_length)
        report = {
            "label": args.label,
            "argv": list(argv) if argv is not None else sys.argv[1:],
            "config": {
                "shape": args.shape, **bc.SHAPES[args.shape], **counts,
                "flops_per_token_train": 6 * counts["n_flops_params"],
                "prompt_len": args.prompt_len, "response_len": args.response_len, "jitter": bc.JITTER,
                "pairs_per_step": args.pairs_per_step, "steps": args.steps, "warmup": args.warmup,
                "max_length": args.max_length, "dtype": args.dtype, "weights_dtype": args.weights_dtype,
                "optim": args.optim, "lr": args.lr, "beta": args.beta,
                "gradient_checkpointing": args.gradient_checkpointing, "torch_compile": args.torch_compile,
                "modpo_overrides": args.modpo_overrides, "modpo_weights": MODPO_WEIGHTS, "seed": args.seed,
                "device": "cuda" if args.on_gpu else "cpu", "peak_tflops": args.peak_tflops,
                "peak_tflops_source": args.peak_tflops_source, "model_build_s": build_s, **bc.device_info(),
            },
            "expected_tokens_per_step": expected,
            "expected_tokens_total": sum(expected),
            "results": {},
            "ratios": {},
        }
        for side in args.sides:
            try:
                report["results"][side] = run_side(side, args, folder, rows, work, weights_dtype,
                                                   counts["n_flops_params"], expected)
            except Exception:  # noqa: BLE001 - record and go on with the other side
                report["results"][side] = {"error": traceback.format_exc()}
                print(f"[throughput] {side} failed:\n{report['results'][side]['error']}", file=sys.stderr)
                gc.collect()
                if args.on_gpu:
                    torch.cuda.empty_cache()
    res = report["results"]
    t = res.get("trl")
    for side in args.variants:
        m = res.get(side)
        if t is None or m is None or "error" in t or "error" in m:
            continue
        ratios = {
            "tokens_per_s": ratio(m["tokens_per_s"], t["tokens_per_s"]),
            "tokens_per_s_mean": ratio(m["tokens_per_s_mean"], t["tokens_per_s_mean"]),
            "mfu": ratio(m["mfu"], t["mfu"]),
            "median_step_s": ratio(m["median_step_s"], t["median_step_s"]),
            # process-wide cumulative RSS on CPU says nothing about one side: no ratio there
            "peak_mem": ratio(m["peak_mem_bytes"], t["peak_mem_bytes"]) if args.on_gpu else None,
        }
        if side == "modpo":
            report["ratios"] = ratios
        else:
            report.setdefault("variant_ratios", {})[side] = ratios
    report["ok"] = all("error" not in r for r in res.values())
    print(markdown_table(report))
    if args.out:
        bc.write_json_atomic(args.out, report)
        print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
