"""`modpo demo`: the paper's pipeline on the synthetic task, from scratch, on a CPU.

1. a tiny Llama initialised at random, with a word-level tokenizer;
2. SFT on base responses (TRL's SFTTrainer);
3. the margin model: DPO on harmlessness preferences; its implicit reward is the harmless margin;
4. MODPO on helpfulness preferences with that margin, one model per weight vector;
5. one weight-conditioned MODPO model for every weight, trained once (`modpo.weight_embedding`);
6. sampling from every model and exact scoring; both fronts and the exact optimum as a table and a PNG.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from modpo.cache import stable_hash, write_atomic
from modpo.demo import task
from modpo.demo.optimum import exact_optimum
from modpo.errors import ConfigError
from modpo.front.sweep import run_front
from modpo.models import tiny_causal_lm
from modpo.run_config import FrontConfig, StageConfig
from modpo.stages import run_preference, run_sft

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = (0.1, 0.3, 0.5, 0.7, 0.9)
COMMON = {"report_to": [], "save_strategy": "no", "logging_steps": 50, "lr_scheduler_type": "constant",
          "disable_tqdm": True, "use_cpu": True, "dataloader_num_workers": 0}
INIT = {"hidden_size": 64, "layers": 2, "heads": 4, "max_positions": 32}  # the initial model's shape
INPUTS_FILE = "inputs.json"
# The margin model (DPO on harmlessness) and every MODPO point; see docs/results.md, "The demo against the exact
# optimum", for why these settings.
MARGIN_TRAINING = {"num_train_epochs": 8, "per_device_train_batch_size": 64, "learning_rate": 3e-3}
MODPO_TRAINING = {"num_train_epochs": 4, "per_device_train_batch_size": 64, "learning_rate": 3e-3}
# One model for the whole front: the demo's weight vectors cycled over rows and epochs, w shown as a learned c(w) in
# the input embeddings; 6 epochs, 30% of the tokens of the five 4-epoch MODPO runs. Evaluated at 11 weights, 6 of
# which it never trained on (docs/results.md, "Weight-conditioned MODPO on the demo task").
CONDITIONED = {"weight_sampling": "cycle", "conditioning": "embedding", "num_train_epochs": 6}
CONDITIONED_WEIGHTS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))


def prepare_inputs(out: Path, seed: int, overwrite: bool = False) -> dict[str, str]:
    """The data files (out/data/*.jsonl) and the initial model (out/init) for `seed`.

    out/inputs.json, written last, records a hash of their content: a folder already holding them for the same
    seed is reused as it is; one holding them for another seed is replaced with --overwrite, refused without.
    """
    data = {"sft": task.sft_rows(3000, seed), "helpful": task.preference_rows(2000, "helpful", seed + 1),
            "harmless": task.preference_rows(2000, "harmless", seed + 2)}
    key = stable_hash({"data": data, "init": {**INIT, "seed": seed, "vocabulary": task.vocabulary()}})
    paths = {name: str(out / "data" / f"{name}.jsonl") for name in data} | {"init": str(out / "init")}
    record = out / INPUTS_FILE
    previous = json.loads(record.read_text()) if record.exists() else None
    if previous and previous.get("key") == key:
        return paths
    if previous and not overwrite:
        raise ConfigError(f"{out} holds demo data and an initial model made otherwise (seed {previous.get('seed')}); "
                          f"pass --overwrite to replace them with those for seed {seed}, or choose another --output-dir")
    record.unlink(missing_ok=True)  # until the new inputs are all written
    for name, rows in data.items():
        write_jsonl(Path(paths[name]), rows)

    tokenizer = task.tokenizer()
    tiny_causal_lm(len(tokenizer), seed=seed, **INIT).save_pretrained(paths["init"])
    tokenizer.save_pretrained(paths["init"])
    write_atomic(record, lambda tmp: tmp.write_text(json.dumps({"seed": seed, "key": key}) + "\n"))
    return paths


class _Stages:
    """One line per stage with its time, to `say`."""

    def __init__(self, say):
        self.say, self.last = say, time.time()

    def done(self, what: str) -> None:
        now = time.time()
        self.say(f"{what}: {now - self.last:.1f} s")
        self.last = now


def run_demo(output_dir: str = "runs/demo", weights=DEFAULT_WEIGHTS, seed: int = 0, beta: float = 0.1,
             overwrite: bool = False, say=logger.info, conditioned: bool = True) -> dict:
    """The whole pipeline; `say` gets one line per stage with its time (default: the module's logger).
    `conditioned`: also train the one weight-conditioned model and report its front beside the per-weight one.

    It runs on one intra-op thread (restored after): the models are tiny, so a second thread only adds
    synchronisation, and on a machine shared with other jobs it made training steps about 10x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(Path(output_dir), weights, seed, beta, overwrite, say, conditioned)
    finally:
        torch.set_num_threads(threads)


def evaluation_settings(seed: int) -> dict:
    """The demo front's evaluation: its prompts, sampling settings and exact evaluator (a FrontConfig.evaluation)."""
    return {"prompts": task.eval_prompts(64, seed + 3), "samples_per_prompt": 4,
            "max_new_tokens": task.RESPONSE_LENGTH, "min_new_tokens": task.RESPONSE_LENGTH,
            "temperature": 1.0, "seed": seed, "evaluators": [{"type": "demo_exact"}], "reference_point": [0.0, 0.0]}


def prepare_models(out: Path, seed: int, beta: float, overwrite: bool = False, say=logger.info) -> dict:
    """The data, the SFT model and the margin model (DPO on harmlessness) of the demo, trained or reused.

    Returns their paths (sft, harmless_dpo, and the data files helpful, harmless) and `preference_training`, the
    trainer settings every preference run of the demo starts from."""
    stages = _Stages(say)
    inputs = prepare_inputs(out, seed, overwrite)
    stages.done("data and initial model")
    sft = run_sft(StageConfig(model=inputs["init"], output_dir=str(out / "sft"), train_data=inputs["sft"], training={
        **COMMON, "num_train_epochs": 4, "per_device_train_batch_size": 64, "learning_rate": 3e-3,
        "max_length": 32, "seed": seed}), overwrite=overwrite)
    stages.done("SFT (or reused)")
    # Responses are exactly RESPONSE_LENGTH words: no eos is scored, and sampling draws exactly that many.
    preference_training = {**COMMON, "append_eos": False, "beta": beta, "max_length": 32, "seed": seed}
    margin_model = run_preference(StageConfig(model=str(sft), output_dir=str(out / "harmless_dpo"),
                                              train_data=inputs["harmless"],
                                              training={**preference_training, **MARGIN_TRAINING}),
                                  "dpo", overwrite=overwrite)
    stages.done("margin model: DPO on harmlessness (or reused)")
    return {"sft": sft, "harmless_dpo": margin_model, "helpful": inputs["helpful"], "harmless": inputs["harmless"],
            "preference_training": preference_training}


def _run_demo(out: Path, weights, seed: int, beta: float, overwrite: bool, say, conditioned: bool) -> dict:
    started = time.time()
    models = prepare_models(out, seed, beta, overwrite, say)
    stages = _Stages(say)
    sft, margin_model = models["sft"], models["harmless_dpo"]
    vectors = task.weight_vectors(weights)
    front = FrontConfig(
        output_dir=str(out / "front"),
        weights=vectors,
        conditioned={**CONDITIONED, "weight_list": vectors} if conditioned else {},
        conditioned_weights=task.weight_vectors(CONDITIONED_WEIGHTS) if conditioned else [],
        train={"model": str(sft), "train_data": models["helpful"],
               "training": {**models["preference_training"], **MODPO_TRAINING},
               "margins": [{"type": "implicit_reward", "model": str(margin_model), "ref_model": str(sft), "beta": beta,
                            "append_eos": False}]},
        evaluation={**evaluation_settings(seed), "extra_models": {"sft": str(sft)}},
    )
    optimum = exact_optimum(str(sft), front.evaluation["prompts"], beta)  # under the SFT model, the reference
    stages.done("exact optimum under the SFT model")
    report = run_front(front, overwrite=overwrite, optimum=optimum, say=say,
                       title="Demo front: MODPO, w = (w_helpful, w_harmless)")
    stages.done("front (MODPO points, the conditioned model, sampling, report)")
    report["demo_wall_seconds"] = round(time.time() - started, 1)
    return report
