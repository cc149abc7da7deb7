"""The files a preference stage runs through, from `stages.run_preference` to the first gradient.

    python benchmarks/call_path.py            # prints the path file by file, the files entered and the returns

A tiny Llama (built here) trains one MODPO step with K = 2: one implicit-reward margin (a perturbed copy of the
model against the model itself) and a length-penalty rule, LoRA on. The interpreter's profile hook records, at every
call and every return, which modpo file runs next; consecutive repeats collapse into one visit. The path ends at
the first call of `loss.modpo_loss`, where the first loss (and so the first gradient) is made. A "return" is a visit
to a file that was already left: what a reader following the batch has to go back to.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import modpo
from modpo.models import tiny_causal_lm, word_tokenizer
from modpo.run_config import StageConfig
from modpo.stages import run_preference

PACKAGE = Path(modpo.__file__).resolve().parent
WORDS = ["p0", "p1", "a", "b", "c", "d"]


class FirstLoss(Exception):
    pass


def build(folder: Path) -> StageConfig:
    tok = word_tokenizer(WORDS)
    base = tiny_causal_lm(len(tok), hidden_size=16, layers=1, heads=2, seed=0)
    base.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    other = tiny_causal_lm(len(tok), hidden_size=16, layers=1, heads=2, seed=1)
    other.save_pretrained(folder / "dpo")
    tok.save_pretrained(folder / "dpo")
    rows = [{"prompt": "p0", "chosen": "a b", "rejected": "c"}, {"prompt": "p1", "chosen": "d", "rejected": "a c"}]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return StageConfig(model=str(folder / "base"), output_dir=str(folder / "out"), train_data=str(folder / "pairs.jsonl"),
                       margins=[{"type": "implicit_reward", "model": str(folder / "dpo"),
                                 "ref_model": str(folder / "base"), "beta": 0.1}],
                       lora={"r": 2, "target_modules": ["q_proj", "v_proj"]},
                       training={"weights": [0.5, 0.5], "per_device_train_batch_size": 2, "max_steps": 1,
                                 "report_to": [], "save_strategy": "no", "cache_dir": str(folder / "cache")})


def trace(cfg: StageConfig) -> list[str]:
    visits: list[str] = []

    def hook(frame, event, arg):
        if event not in ("call", "return"):
            return
        target = frame if event == "call" else frame.f_back
        if event == "call" and frame.f_code.co_name == "modpo_loss" and frame.f_code.co_filename.endswith("loss.py"):
            visits.append("loss.py")
            raise FirstLoss
        while target is not None and not target.f_code.co_filename.startswith(str(PACKAGE)):
            target = target.f_back  # in a library: the modpo file it was called from is still the one being read
        if target is None:
            return
        name = str(Path(target.f_code.co_filename).resolve().relative_to(PACKAGE))
        if not visits or visits[-1] != name:
            visits.append(name)

    sys.setprofile(hook)
    try:
        run_preference(cfg, "train", overwrite=True)
    except FirstLoss:
        pass
    finally:
        sys.setprofile(None)
    start = visits.index("stages.py") if "stages.py" in visits else 0
    return visits[start:]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory() as folder:
        visits = trace(build(Path(folder)))
    seen, returns = set(), 0
    for name in visits:
        returns += name in seen
        seen.add(name)
    print(" -> ".join(visits))
    print(f"files entered: {len(seen)}; visits: {len(visits)}; returns to a file already left: {returns}")
    for name in sorted(seen, key=visits.index):
        print(f"  {name}: {visits.count(name)} visit(s)")


if __name__ == "__main__":
    main()
