"""Do the batch layouts agree on this machine? Padded, padding-free and prefix-sharing batches of the same pairs
must give the same sequence log-probs and the same gradients (up to the precision's rounding).

On CUDA this exercises PyTorch's variable-length flash attention, including the rejected responses' queries
against their prompt's keys (fewer queries than keys, bottom-right causal alignment), which CPU tests cannot
reach. Run it before trusting GPU timings of `padding_free` / `prefix_sharing`:

    python benchmarks/layout_check.py                 # CUDA if present (bf16 autocast), else CPU fp32
    python benchmarks/layout_check.py --device cpu

Prints the largest differences against the padded layout; exit status 1 if one is above the tolerance.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

LAYOUTS = {"padding_free": {"padding_free": True}, "prefix_sharing": {"prefix_sharing": True},
           "prefix_sharing_bucketed": {"prefix_sharing": True, "pad_to_multiple_of": 64}}


def random_pairs(pairs: int, vocab: int, seed: int):
    rng = random.Random(seed)
    words = lambda n: [rng.randrange(bc.SPECIALS, vocab) for _ in range(n)]
    prompts = [words(rng.randint(20, 120)) for _ in range(pairs)]
    chosen = [words(rng.randint(10, 200)) for _ in range(pairs)]
    rejected = [words(rng.randint(10, 200)) for _ in range(pairs)]
    return prompts, chosen, rejected


def crossing(batch: dict) -> dict:
    """A deliberately wrong packed batch: one attention segment over the whole row (sequences see each other)."""
    import torch

    total = batch["input_ids"].shape[1]
    whole = torch.tensor([0, total], dtype=torch.int32)
    return {**batch, "cu_seq_lens_q": whole, "cu_seq_lens_k": whole, "max_length_q": total, "max_length_k": total}


def logps_and_grads(model, layout: dict, pairs, device, autocast_dtype, broken: bool = False):
    import torch

    from modpo.batch import concatenated_inputs, to_device
    from modpo.logps import sequence_logps
    from modpo.packing import use_padding_free

    model = copy.deepcopy(model)
    if layout:
        use_padding_free(model, prefix_sharing=layout.get("prefix_sharing", False))
    batch = concatenated_inputs(*pairs, pad_token_id=0, **layout)
    batch = crossing(batch) if broken else batch
    batch = to_device(batch, device)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        values = sequence_logps(model, num_sequences=2 * len(pairs[0]), **batch)
    weights = torch.linspace(-1, 1, values.shape[0], device=device)
    (values * weights).sum().backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return values.detach().float().cpu(), grads.cpu()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--shape", default="small", choices=sorted(bc.SHAPES))
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import torch
    from transformers import Qwen2ForCausalLM

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    # bf16 rounds attention and matmuls differently per layout; fp32 agrees to float rounding
    value_tol, grad_tol = (1e-2, 0.05) if autocast_dtype else (1e-4, 1e-4)
    torch.manual_seed(args.seed)
    config = bc.qwen2_config(args.shape)
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).to(device)
    pairs = random_pairs(args.pairs, config.vocab_size, args.seed)
    reference, reference_grads = logps_and_grads(model, {}, pairs, device, autocast_dtype)
    print(f"device {device}, {'bf16 autocast' if autocast_dtype else 'fp32'}, shape {args.shape}, {args.pairs} pairs; "
          f"padded log-probs {[round(v, 2) for v in reference.tolist()]}")
    ok = True
    runs = [(name, layout, False) for name, layout in LAYOUTS.items()]
    runs.append(("control (must mismatch)", {"padding_free": True}, True))
    for name, layout, broken in runs:
        values, grads = logps_and_grads(model, layout, pairs, device, autocast_dtype, broken)
        value_err = ((values - reference).abs() / reference.abs().clamp(min=1)).max().item()
        grad_err = ((grads - reference_grads).norm() / reference_grads.norm()).item()
        agree = value_err <= value_tol and grad_err <= grad_tol
        good = agree != broken  # the control's attention crosses sequences: the check must see it
        ok &= good
        print(f"{name:>24}: max relative log-prob difference {value_err:.2e}, relative gradient difference "
              f"{grad_err:.2e} -> {'agree' if agree else 'MISMATCH'}{'' if good else '  <-- FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
