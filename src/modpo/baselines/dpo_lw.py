"""DPO LW (loss weighting): DPO on the union of every objective's preference pairs, each row weighted.

For weights w, a row of objective k carries `loss_weight = w_k`, and MODPOTrainer with weights [1.0] (plain
DPO) multiplies each pair's loss by it:

    loss = mean over the batch of  w_{k(i)} * -log sigmoid(beta * (log pi/pi_ref(y_w|x) - log pi/pi_ref(y_l|x)))

so the expected loss is proportional to sum_k w_k * L_DPO(D_k). Unlike MODPO it fits each objective's pairs
with one shared implicit reward, which cannot rank the same responses both ways.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from modpo.cache import write_atomic
from modpo.run_config import StageConfig
from modpo.stages import run_preference

LOSS_WEIGHT = "loss_weight"
KEEP = ("prompt", "chosen", "rejected")


def union_rows(datasets: Mapping[str, Sequence[dict]], weights: Mapping[str, float]) -> list[dict]:
    """Rows of every objective's preference set, in order, each with `loss_weight` = its objective's weight."""
    missing = sorted(set(datasets) - set(weights))
    if missing:
        raise ValueError(f"no weight for objective(s) {missing}")
    out = []
    for objective, rows in datasets.items():
        for row in rows:
            out.append({**{k: row[k] for k in KEEP}, "objective": objective, LOSS_WEIGHT: float(weights[objective])})
    return out


def union_data_spec(path: str) -> dict:
    """The train_data spec that keeps the loss_weight column (load_preferences drops unknown columns otherwise)."""
    return {"loader": "jsonl", "path": path,
            "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", LOSS_WEIGHT: LOSS_WEIGHT}}


def write_union(folder: Path, name: str, datasets: Mapping[str, Sequence[dict]], weights: Mapping[str, float]) -> str:
    """Write the union as `folder/union_<name>_<content hash>.jsonl`: a run config names its data by content."""
    rows = union_rows(datasets, weights)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path = folder / f"union_{name}_{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not path.exists():
        write_atomic(path, lambda tmp: tmp.write_text(text))
    return str(path)


def train_dpo_lw(model: str, datasets: Mapping[str, Sequence[dict]], weights: Mapping[str, float], output_dir,
                 training: dict, overwrite: bool = False) -> Path:
    """Train (or reuse) one DPO-LW model; returns its folder (with modpo_run.json and token_counts)."""

    out = Path(output_dir)
    data = write_union(out.parent.parent / "data", out.name, datasets, weights)
    training = {**training, "weights": [1.0]}
    cfg = StageConfig(model=model, output_dir=str(out), train_data=union_data_spec(data), training=training)
    return run_preference(cfg, "dpo", overwrite=overwrite)
