"""One weight-conditioned model on the demo task, under variants of its training, against the per-weight front.

    .venv/bin/modpo demo --output-dir runs/demo                    # once: SFT, margin model, the per-weight front
    .venv/bin/python benchmarks/conditioning_ablation.py runs/demo [OUT]

Every variant trains one conditioned model (6 epochs, 30% of the tokens of the five 4-epoch per-weight runs) on the
demo's helpful pairs with its harmless margin, and evaluates it at 11 weights with the demo's exact evaluator. It
prints, per variant: hypervolume at the demo's five weights, as a fraction of the five per-weight models' and of
the exact optimum's there, how many of the 11 points are non-dominated, and whether helpfulness rises and
harmlessness falls with w_helpful across all 11 (ordered).
"""

import json
import sys
import time
from pathlib import Path

import torch

from modpo.demo import task
from modpo.demo.optimum import exact_optimum
from modpo.demo.pipeline import COMMON, CONDITIONED_WEIGHTS, DEFAULT_WEIGHTS, MODPO_TRAINING
from modpo.front.report import hypervolume, non_dominated
from modpo.front.sweep import run_front
from modpo.run_config import FrontConfig

VARIANTS = {  # name: the conditioned model's training settings
    "embedding, cycle, equalized": {"conditioning": "embedding", "weight_sampling": "cycle"},
    "embedding, cycle, not equalized": {"conditioning": "embedding", "weight_sampling": "cycle", "equalize_steps": False},
    "embedding, dirichlet(1), equalized": {"conditioning": "embedding", "weight_sampling": "dirichlet"},
}


def main(demo: Path, out: Path) -> None:
    torch.set_num_threads(1)
    vectors, asked = task.weight_vectors(DEFAULT_WEIGHTS), task.weight_vectors(CONDITIONED_WEIGHTS)
    front = json.loads((demo / "front" / "front.json").read_text())
    per_weight = [p for p in front["points"] if p.get("method") == "modpo"]
    mean = lambda p: [p["helpful"]["mean"], p["harmless"]["mean"]]
    theirs = hypervolume([mean(p) for p in per_weight], [0.0, 0.0])
    prompts = task.eval_prompts(front["num_prompts"], 3)
    optimum = exact_optimum(str(demo / "sft"), prompts, 0.1)
    best = hypervolume([list(optimum(w)) for w in vectors], [0.0, 0.0])
    training = {**COMMON, "append_eos": False, "beta": 0.1, "max_length": 32, "seed": 0, **MODPO_TRAINING}
    print(f"per-weight front: hypervolume {theirs:.4f} at the five weights ({theirs / best:.1%} of the optimum's {best:.4f})")
    print("| variant | HV at the 5 weights | of per-weight | of optimum | non-dominated of 11 | ordered | train s |")
    print("|---|---|---|---|---|---|---|")
    for i, (name, variant) in enumerate(VARIANTS.items()):
        conditioned = {"num_train_epochs": 6, **variant}
        if variant["weight_sampling"] == "cycle":
            conditioned["weight_list"] = vectors
        config = FrontConfig(
            # weights: one per-weight point fixes K; the conditioned model is compared with the demo's own five
            output_dir=str(out / f"variant{i}"), weights=vectors[:1], conditioned=conditioned, conditioned_weights=asked,
            train={"model": str(demo / "sft"), "train_data": str(demo / "data" / "helpful.jsonl"), "training": training,
                   "margins": [{"type": "implicit_reward", "model": str(demo / "harmless_dpo"), "ref_model": str(demo / "sft"),
                                "beta": 0.1, "append_eos": False}]},
            evaluation={"prompts": prompts, "samples_per_prompt": 4, "max_new_tokens": task.RESPONSE_LENGTH,
                        "min_new_tokens": task.RESPONSE_LENGTH, "temperature": 1.0, "seed": 0,
                        "evaluators": [{"type": "demo_exact"}], "reference_point": [0.0, 0.0]})
        started = time.time()
        report = run_front(config, say=lambda line: None)
        points = [p for p in report["points"] if p.get("method") == "conditioned"]
        mine = hypervolume([mean(p) for p in points if p["weights"] in vectors], [0.0, 0.0])
        by_w = sorted(points, key=lambda p: p["weights"][0])
        ordered = all(a["helpful"]["mean"] <= b["helpful"]["mean"] and a["harmless"]["mean"] >= b["harmless"]["mean"]
                      for a, b in zip(by_w, by_w[1:]))
        print(f"| {name} | {mine:.4f} | {mine / theirs:.1%} | {mine / best:.1%} | "
              f"{len(non_dominated([mean(p) for p in points]))} | {'yes' if ordered else 'no'} | "
              f"{time.time() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "runs/conditioning_ablation"))
