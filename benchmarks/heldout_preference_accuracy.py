"""Held-out preference accuracy of every model of a front, from the models themselves (no evaluator model).

    .venv/bin/python benchmarks/heldout_preference_accuracy.py FRONT_DIR BASE_DIR DATA_SPEC_JSON [MAX_LENGTH]

For each point of FRONT_DIR (points/*, and the conditioned model at each weight vector it was evaluated at):
the fraction of held-out preference pairs on which its implicit reward beta * log pi/pi_ref ranks the chosen
response above the rejected one, pi_ref = BASE_DIR (the policy as it started), with its binomial standard error and
the mean implicit reward margin. DATA_SPEC_JSON is a loader spec, e.g.
'{"loader": "ultrafeedback", "path": "../shared/data/ultrafeedback_binarized_eval200.jsonl", "as_chat": true, "limit": 64}'.
This measures objective 0 (the preference pairs) directly: a front whose evaluator reward model is under its floor
still shows how much of the preference objective each weight vector gives up.
"""

import json
import math
import sys
import time
from pathlib import Path

from modpo.data.encode import scoring_ids
from modpo.front.steer import steering
from modpo.logps import batched_pair_logps
from modpo.models import load_model, load_tokenizer
from modpo.stages import load_data


def pair_ids(data, tokenizer, max_length: int):
    pairs = [scoring_ids(p, [c, r], tokenizer, max_length, True)
             for p, c, r in zip(data["prompt"], data["chosen"], data["rejected"])]
    return [p for p, _ in pairs], [c for _, (c, _) in pairs], [r for _, (_, r) in pairs]


def main(front: Path, base: str, spec: dict, max_length: int) -> None:
    tokenizer = load_tokenizer(base)
    data, _ = load_data(spec, "held-out pairs")
    ids = pair_ids(data, tokenizer, max_length)
    pad = tokenizer.pad_token_id
    reference = batched_pair_logps(load_model(base), *ids, pad, batch_size=8)
    beta = 0.1
    rows = []
    jobs = [(d.name, d, None) for d in sorted((front / "points").iterdir())]
    report = json.loads((front / "front.json").read_text())
    jobs += [(p["name"], front / "conditioned", p["weights"]) for p in report["points"] if p.get("method") == "conditioned"]
    models = {}
    for name, folder, weights in jobs:
        started = time.time()
        model = models.setdefault(folder, load_model(str(folder)))
        if weights is None:
            chosen, rejected = batched_pair_logps(model, *ids, pad, batch_size=8)
        else:
            with steering(folder, model, tokenizer, weights) as prefix:
                assert not prefix, "this script steers embedding-conditioned models"
                chosen, rejected = batched_pair_logps(model, *ids, pad, batch_size=8)
        margin = beta * ((chosen - reference[0]) - (rejected - reference[1]))
        accuracy = ((margin > 0).double().mean() + 0.5 * (margin == 0).double().mean()).item()
        rows.append((name, accuracy, math.sqrt(accuracy * (1 - accuracy) / len(margin)), margin.mean().item(),
                     time.time() - started))
        print(f"| {name} | {accuracy:.3f} ± {rows[-1][2]:.3f} | {rows[-1][3]:+.4f} | {rows[-1][4]:.0f} |", flush=True)
    (front / "heldout_preference_accuracy.json").write_text(json.dumps(
        [{"point": n, "accuracy": a, "stderr": s, "mean_margin": m, "seconds": t} for n, a, s, m, t in rows], indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 256)
