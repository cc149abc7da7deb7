"""Faults: `kill -9` in the middle of training, of the precompute and of a front sweep; numerical safety;
determinism.

A kill must land at a known point, so the killed command runs through a small wrapper script (WRAPPER)
that patches one function to write a marker file and then wait forever at that point; the test waits for
the marker and sends SIGKILL. The wrapper changes no numbers: it only pauses. Everything else, the resume
and the reference runs included, goes through `modpo.cli.main` in this process, exactly as `modpo ...`.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from modpo.guard import LOCK_FILE  # the run's lock, kept as the folder's mark
from tiny import run_cli as cli, write_jsonl, write_yaml
from modpo.cli import main
from modpo.demo import task
from modpo.front.sweep import point_name
from modpo.loss import modpo_loss

SEED = 3

# The killed command: `python fault_wrapper.py <modpo arguments>`, paused where FAULT_AT says.
WRAPPER = r'''
import os, sys, time
from pathlib import Path

marker, where = Path(os.environ["FAULT_MARKER"]), os.environ["FAULT_AT"]
kind, _, arg = where.partition(":")


def pause():
    marker.write_text(where)
    while True:  # until SIGKILL
        time.sleep(1)


from modpo.trainer import MODPOTrainer

if kind in ("step", "point"):  # inside a training step: after its loss, before its backward pass
    compute_loss = MODPOTrainer.compute_loss

    def paused_compute_loss(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        if model.training and (self.state.global_step == int(arg) if kind == "step" else arg in self.args.output_dir):
            pause()
        return loss

    MODPOTrainer.compute_loss = paused_compute_loss
elif kind == "checkpoint":  # inside a checkpoint save: the weights are written, optimizer/RNG/trainer state not yet
    save = MODPOTrainer._save_optimizer_and_scheduler

    def paused_save(self, output_dir):
        if self.state.global_step == int(arg):
            pause()
        return save(self, output_dir)

    MODPOTrainer._save_optimizer_and_scheduler = paused_save
elif kind == "cache-write":  # inside the write of a reference log-prob cache entry: half its bytes are on disk
    import modpo.cache

    save_file = modpo.cache.save_file

    def torn_save_file(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        if (metadata or {}).get("kind") == "reference_logps":
            size = os.path.getsize(filename)
            with open(filename, "r+b") as f:
                f.truncate(size // 2)
            pause()

    modpo.cache.save_file = torn_save_file
else:
    raise SystemExit(f"unknown FAULT_AT {where}")

from modpo.cli import main

sys.exit(main(sys.argv[1:]))
'''


# --------------------------------------------------------------------------------------------- helpers




def kill_at(tmp_path: Path, where: str, argv: list[str]) -> str:
    """Run `modpo <argv>` in a subprocess until it reaches `where`, SIGKILL it there; returns its output."""
    script, marker, log_file = tmp_path / "fault_wrapper.py", tmp_path / "paused", tmp_path / "killed.log"
    script.write_text(WRAPPER)
    marker.unlink(missing_ok=True)
    env = {**os.environ, "FAULT_AT": where, "FAULT_MARKER": str(marker)}
    with open(log_file, "w") as log:
        process = subprocess.Popen([sys.executable, str(script), *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 900  # a guard against a hung test, not a timing check
            while not marker.exists():
                if process.poll() is not None:
                    pytest.fail(f"the command exited ({process.returncode}) before reaching {where}:\n"
                                f"{log_file.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"the command never reached {where}")
                time.sleep(0.05)
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL, log_file.read_text()[-3000:]
    return log_file.read_text()



def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    ours, theirs = weights(a), weights(b)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-7), \
            f"{name}: max difference {(ours[name] - theirs[name]).abs().max().item():.3g}"


def losses_by_step(trainer_state: Path) -> dict[int, float]:
    history = json.loads(trainer_state.read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    tok = tiny.tokenizer()
    return tiny.save(tiny.model(len(tok), seed=0), tok, tmp_path_factory.mktemp("base") / "lm")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", tiny.rows(32, seed=1))


# 32 pairs, batch 4: 8 steps an epoch; 12 steps cross an epoch boundary. A checkpoint every 4 steps.
RESUMABLE = {"use_cpu": True, "report_to": [], "disable_tqdm": True, "seed": SEED, "max_steps": 12,
             "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1,
             "save_strategy": "steps", "save_steps": 4, "save_total_limit": 3}


def dpo_config(folder: Path, base: str, pairs: str, name: str = "run", **training) -> tuple[str, Path]:
    out = folder / name
    config = {"model": base, "output_dir": str(out), "train_data": pairs, "training": {**RESUMABLE, **training}}
    return write_yaml(folder / f"{name}.yaml", config), out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, base, pairs) -> Path:
    """The reference: the resumable config run start to finish without a kill."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    config, out = dpo_config(folder, base, pairs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODPO_CACHE", str(folder / "modpo-cache"))
        assert main(["dpo", "--config", config]) == 0
    return out


# ------------------------------------------------------------------------------ 1. kill -9 during training


@pytest.mark.parametrize("where", ["step:6", "checkpoint:8"], ids=["mid-step", "mid-checkpoint-save"])
def test_kill_during_training_then_resume(capsys, caplog, tmp_path, base, pairs, uninterrupted, where):
    """SIGKILL inside step 7 (after checkpoint-4), or inside the save of checkpoint-8 (weights written, optimizer,
    RNG and trainer state not yet): `--resume` continues from the last *complete* checkpoint and ends with
    the same weights and the same loss curve as the run that was never interrupted."""
    config, out = dpo_config(tmp_path, base, pairs)
    kill_at(tmp_path, where, ["dpo", "--config", config])
    assert not (out / "modpo_run.json").exists() and not (out / "model.safetensors").exists()
    checkpoints = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    if where.startswith("checkpoint"):
        assert checkpoints == ["checkpoint-4", "checkpoint-8"]
        torn = out / "checkpoint-8"
        assert (torn / "model.safetensors").exists() and not (torn / "trainer_state.json").exists()
    else:
        assert checkpoints == ["checkpoint-4"]
    # Steps 1..4 of the killed run were the uninterrupted run's steps.
    early = losses_by_step(out / "checkpoint-4" / "trainer_state.json")
    assert early == {s: v for s, v in losses_by_step(uninterrupted / "checkpoint-12" / "trainer_state.json").items() if s <= 4}

    code, stdout, err = cli(capsys, "dpo", "--config", config, "--resume")
    assert code == 0, err[-3000:]
    assert stdout.strip().endswith(f"saved to {out}")
    if where.startswith("checkpoint"):
        assert "skipping incomplete checkpoint(s) checkpoint-8 (killed while saving); resuming from checkpoint-4" \
            in caplog.text
    assert_same_weights(out, uninterrupted)
    # The resumed run replays steps 5..12 exactly: same data order, optimizer, schedule and RNG.
    assert losses_by_step(out / "checkpoint-12" / "trainer_state.json") == \
        losses_by_step(uninterrupted / "checkpoint-12" / "trainer_state.json")
    record = json.loads((out / "modpo_run.json").read_text())
    assert record["seed"] == SEED and record["stage"] == "dpo"


# ---------------------------------------------------------------------------- 2. kill -9 during precompute


def test_kill_during_precompute_leaves_no_partial_cache_entry(capsys, tmp_path, monkeypatch, base, pairs):
    """SIGKILL while a reference log-prob cache entry is half written: no entry exists under its real name
    (only a `.tmp` file, which is ignored), and the rerun recomputes exactly what a clean run computes."""
    cache = tmp_path / "modpo-cache"  # this test's MODPO_CACHE (conftest), inherited by the subprocess
    assert os.environ["MODPO_CACHE"] == str(cache)
    config, out = dpo_config(tmp_path, base, pairs, max_steps=2, save_strategy="no")
    kill_at(tmp_path, "cache-write", ["dpo", "--config", config])

    entries = list(cache.rglob("*.safetensors"))
    leftovers = list(cache.rglob("*.tmp"))
    assert entries == [], f"a cache entry exists after the kill: {entries}"
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".")
    with pytest.raises(Exception):
        load_file(str(leftovers[0]))  # it really is torn
    assert not (out / "modpo_run.json").exists()

    code, _, err = cli(capsys, "dpo", "--config", config)
    assert code == 0, err[-3000:]
    entries = list((cache / "reference_logps").glob("*.safetensors"))
    assert len(entries) == 1
    rerun = load_file(str(entries[0]))  # loads: the entry is whole

    clean_cache = tmp_path / "clean-cache"
    monkeypatch.setenv("MODPO_CACHE", str(clean_cache))
    clean_config, clean_out = dpo_config(tmp_path, base, pairs, name="clean", max_steps=2, save_strategy="no")
    code, _, err = cli(capsys, "dpo", "--config", clean_config)
    assert code == 0, err[-3000:]
    (clean_entry,) = (clean_cache / "reference_logps").glob("*.safetensors")
    assert clean_entry.name == entries[0].name  # the same key
    clean = load_file(str(clean_entry))
    assert rerun.keys() == clean.keys() == {"chosen", "rejected"}
    for side in rerun:
        assert rerun[side].shape == (32,) and torch.isfinite(rerun[side]).all()
        assert torch.equal(rerun[side], clean[side])
    assert_same_weights(out, clean_out)


# --------------------------------------------------------------------------- 3. kill -9 during a front sweep


FRONT_WEIGHTS = [[0.2, 0.8], [0.5, 0.5], [0.8, 0.2]]
SAMPLING_SEED = 11


def demo_front(tmp_path: Path, weights: list) -> tuple[str, Path]:
    """A `modpo front` config on the demo task: tiny model, margins = exact harmlessness, 2 steps a point."""
    tok = task.tokenizer()
    model = tiny.save(tiny.model(len(tok), seed=0, hidden_size=16, max_positions=32), tok, tmp_path / "init")
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
             "chosen_margins": [r["chosen_harmless"]], "rejected_margins": [r["rejected_harmless"]]}
            for r in task.preference_rows(16, "helpful", seed=1)]
    out = tmp_path / "front"
    config = write_yaml(tmp_path / "front.yaml", {
        "output_dir": str(out), "weights": weights,
        "train": {"model": model, "train_data": write_jsonl(tmp_path / "helpful.jsonl", rows),
                  "training": {"use_cpu": True, "report_to": [], "save_strategy": "no", "max_steps": 2,
                               "per_device_train_batch_size": 8, "disable_tqdm": True, "seed": SEED,
                               "append_eos": False, "max_length": 8, "learning_rate": 1e-2}},
        "evaluation": {"prompts": task.eval_prompts(4, seed=2), "samples_per_prompt": 2,
                       "max_new_tokens": task.RESPONSE_LENGTH, "min_new_tokens": task.RESPONSE_LENGTH,
                       "seed": SAMPLING_SEED, "evaluators": [{"type": "demo_exact"}], "reference_point": [0.0, 0.0]}})
    return config, out


def test_kill_during_front_sweep_then_rerun(capsys, tmp_path):
    """SIGKILL while the second point trains: the rerun keeps the finished first point as it is (not
    retrained, not re-sampled), trains the rest, and writes a complete report with all three points."""
    config, out = demo_front(tmp_path, FRONT_WEIGHTS)
    names = [point_name(w) for w in FRONT_WEIGHTS]
    assert names == ["w0.2_0.8", "w0.5_0.5", "w0.8_0.2"]

    kill_at(tmp_path, f"point:{names[1]}", ["front", "--config", config])
    first = out / "points" / names[0]
    kept = ("modpo_run.json", "evaluation.json", "model.safetensors")
    before = {f: ((first / f).stat().st_mtime_ns, (first / f).read_bytes()) for f in kept}
    assert not (out / "points" / names[1] / "modpo_run.json").exists()
    assert not (out / "points" / names[2]).exists()
    assert not (out / "front.json").exists()

    code, stdout, err = cli(capsys, "front", "--config", config)
    assert code == 0, err[-3000:]
    after = {f: ((first / f).stat().st_mtime_ns, (first / f).read_bytes()) for f in kept}
    assert after == before, "the finished point was retrained or re-sampled"
    report = json.loads((out / "front.json").read_text())
    assert [p["name"] for p in report["points"]] == names
    assert [p["weights"] for p in report["points"]] == FRONT_WEIGHTS
    assert all(p["n"] == 8 for p in report["points"])
    assert report["sampling"]["seed"] == SAMPLING_SEED  # the sampling seed is in the report
    for name in names:
        point = out / "points" / name
        assert json.loads((point / "modpo_run.json").read_text())["seed"] == SEED
        assert f"- seed: {SEED}" in (point / "README.md").read_text()
        assert json.loads((point / "evaluation.json").read_text())["sampling"]["seed"] == SAMPLING_SEED
    for name in names:
        assert f"| {name} |" in stdout  # front.md printed in full


# ------------------------------------------------------------------------------------- 4. numerical safety


POISON_AT_CALL = 3  # the third training forward pass: step index 2 (two steps completed)


def poison(model, after_calls: int, seen: dict | None = None):
    """From its `after_calls`-th training forward pass on, the model's final norm outputs inf (x 0 = nan)."""
    seen = seen if seen is not None else {}
    seen["calls"], input_ids = 0, []

    def hook(module, inputs, output):
        if not module.training:  # the reference precompute runs in eval mode and stays finite
            return output
        seen["calls"] += 1
        if seen["calls"] >= after_calls:
            seen.setdefault("input_ids", input_ids[-1])
            return output * float("inf")
        return output

    model.register_forward_pre_hook(lambda m, a, kw: input_ids.append(kw["input_ids"]), with_kwargs=True)
    model.model.norm.register_forward_hook(hook)
    return model


@pytest.mark.parametrize("checkpoints", [False, True], ids=["no-checkpoints", "checkpoints"])
def test_non_finite_loss_stops_training_naming_step_and_rows(capsys, tmp_path, monkeypatch, base, checkpoints):
    """The policy starts producing inf activations at its third training forward pass: training stops there
    with FloatingPointError naming step 2 and exactly the data rows of that batch; the CLI prints one line and
    exits 1. The output folder it created is removed, unless it holds checkpoints by then: they are kept."""
    import modpo.stages

    rows = tiny.rows(8, seed=4)
    texts = [f"{r['prompt']} {r['chosen']}" for r in rows]
    assert len(set(texts)) == len(texts)  # every row is recognisable from its chosen sequence
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    seen = {}
    load_model = modpo.stages.load_model  # where the stage loads its policy
    monkeypatch.setattr(modpo.stages, "load_model", lambda *a, **kw: poison(load_model(*a, **kw), POISON_AT_CALL, seen))
    out = tmp_path / "out"
    saving = {"save_strategy": "steps", "save_steps": 1} if checkpoints else {"save_strategy": "no"}
    config = write_yaml(tmp_path / "c.yaml", {"model": base, "output_dir": str(out), "train_data": data, "training": {
        "use_cpu": True, "report_to": [], "disable_tqdm": True, "seed": SEED, "max_steps": 4,
        "per_device_train_batch_size": 3, "append_eos": False, **saving}})
    code, stdout, err = cli(capsys, "train", "--config", config)
    assert code == 1
    assert stdout == ""
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    match = re.fullmatch(r"modpo: error: non-finite MODPO loss \((nan|inf|-inf)\) at step (\d+), "
                         r"batch of data rows \[([\d, ]+)\]", message)
    assert match, message
    assert int(match.group(2)) == POISON_AT_CALL - 1
    named = [int(r) for r in match.group(3).split(", ")]
    # The rows named are the rows whose chosen sequences were in the poisoned batch (the first half of it).
    tok = tiny.tokenizer()
    batch = seen["input_ids"]
    pairs_in_batch = batch.shape[0] // 2
    decoded = sorted(tok.decode(ids, skip_special_tokens=True) for ids in batch[:pairs_in_batch])
    assert sorted(texts[r - 1] for r in named) == decoded
    assert len(named) == pairs_in_batch and all(1 <= r <= len(rows) for r in named)
    if checkpoints:  # steps 1 and 2 were saved before step 3 failed; no final model, no run record
        assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == ["checkpoint-1", "checkpoint-2"]
        assert (out / "checkpoint-2" / "trainer_state.json").exists()
    else:
        assert not out.exists(), "the failed run left its output folder behind"


def test_non_finite_loss_in_a_later_front_point_keeps_the_finished_points(capsys, tmp_path, monkeypatch):
    """The second point of a new front hits a non-finite loss: exit 1, one line; the first point, trained
    and evaluated, stays (the front folder is not removed), and the rerun trains only the second point."""
    import modpo.stages

    weights = [[0.2, 0.8], [0.8, 0.2]]
    names = [point_name(w) for w in weights]
    config, out = demo_front(tmp_path, weights)
    load = modpo.stages._load

    def poisoned_load(cfg, *args, **kwargs):
        model, tokenizer = load(cfg, *args, **kwargs)
        return (poison(model, 1) if cfg.output_dir.endswith(names[1]) else model), tokenizer

    monkeypatch.setattr(modpo.stages, "_load", poisoned_load)
    code, stdout, err = cli(capsys, "front", "--config", config)
    assert code == 1 and "Traceback" not in err
    assert re.fullmatch(r"modpo: error: non-finite MODPO loss \(nan\) at step 0, batch of data rows \[[\d, ]+\]",
                        err.strip().splitlines()[-1])
    first = out / "points" / names[0]
    kept = {f: (first / f).stat().st_mtime_ns for f in ("modpo_run.json", "evaluation.json", "model.safetensors")}
    assert not (out / "points" / names[1] / "modpo_run.json").exists() and not (out / "front.json").exists()

    monkeypatch.setattr(modpo.stages, "_load", load)
    code, _, err = cli(capsys, "front", "--config", config)
    assert code == 0, err[-3000:]
    assert {f: (first / f).stat().st_mtime_ns for f in kept} == kept
    assert [p["name"] for p in json.loads((out / "front.json").read_text())["points"]] == names


def test_non_finite_loss_raises_floating_point_error_from_the_trainer(tmp_path, base):
    """The same stop without the CLI: MODPOTrainer.train raises FloatingPointError (a weight set to inf
    after the reference was computed: the first step's loss is not finite)."""
    from datasets import Dataset

    from modpo import MODPOConfig, MODPOTrainer
    from modpo.models import load_model, load_tokenizer

    model, tok = load_model(base), load_tokenizer(base)
    args = MODPOConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no", seed=SEED,
                       max_steps=2, per_device_train_batch_size=4, disable_tqdm=True)
    trainer = MODPOTrainer(model, args=args, train_dataset=Dataset.from_list(tiny.rows(4, seed=5)), processing_class=tok)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"non-finite MODPO loss \(nan\) at step 0, batch of data rows \[") as error:
        trainer.train()
    rows = json.loads(str(error.value).split("batch of data rows ")[1])
    assert sorted(rows) == [1, 2, 3, 4]


def test_log_sigmoid_in_fp32_for_bf16_inputs():
    """bf16 log-probs (large, close together: where bf16 arithmetic loses the difference) give fp32 losses
    equal to the fp64 computation on the same bf16 values."""
    generator = torch.Generator().manual_seed(0)
    n = 64
    policy_chosen = (-120 + 8 * torch.rand(n, generator=generator)).bfloat16()
    policy_rejected = (-120 + 8 * torch.rand(n, generator=generator)).bfloat16()
    ref_chosen = (policy_chosen.double() + torch.randn(n, generator=generator, dtype=torch.float64)).bfloat16()
    ref_rejected = (policy_rejected.double() + torch.randn(n, generator=generator, dtype=torch.float64)).bfloat16()
    chosen_margins = torch.randn(n, 1, generator=generator).bfloat16()
    rejected_margins = torch.randn(n, 1, generator=generator).bfloat16()
    w, beta = [0.3, 0.7], 0.5
    losses, chosen_rewards, rejected_rewards = modpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                          chosen_margins, rejected_margins, w, beta=beta)
    assert losses.dtype == chosen_rewards.dtype == rejected_rewards.dtype == torch.float32

    d = lambda t: t.double()  # the bf16 values, exactly, in fp64
    z = (beta * ((d(policy_chosen) - d(ref_chosen)) - (d(policy_rejected) - d(ref_rejected)))
         - w[1] * (d(chosen_margins) - d(rejected_margins))[:, 0]) / w[0]
    expected = -torch.nn.functional.logsigmoid(z)
    assert torch.allclose(losses.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(chosen_rewards.double(), beta * (d(policy_chosen) - d(ref_chosen)), rtol=1e-6, atol=1e-6)

    # The same maths in bf16 is far off: the check above is one bf16 arithmetic would fail.
    b = (beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
         - w[1] * (chosen_margins - rejected_margins)[:, 0]) / w[0]
    assert (-torch.nn.functional.logsigmoid(b).double() - expected).abs().max() > 1e-3
    # Extreme logits stay finite and exact in fp32: log sigmoid(-200) = -200, log sigmoid(200) = -exp(-200).
    big = torch.tensor([-1000.0, 1000.0]).bfloat16()
    zeros = torch.zeros(2).bfloat16()
    extreme, _, _ = modpo_loss(big, zeros, zeros, zeros, None, None, [1.0], beta=0.2)
    assert torch.isfinite(extreme).all()
    assert extreme[0].item() == pytest.approx(200.0) and extreme[1].item() == pytest.approx(math.exp(-200), abs=1e-30)


# ------------------------------------------------------------------------------------------ 5. determinism


def loss_curve(base: str, folder: Path, seed: int) -> list[float]:
    from datasets import Dataset

    from modpo import MODPOConfig, MODPOTrainer
    from modpo.models import load_model, load_tokenizer

    args = MODPOConfig(output_dir=str(folder), report_to=[], use_cpu=True, save_strategy="no", seed=seed,
                       max_steps=6, per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True,
                       learning_rate=1e-2, weights=[0.6, 0.4])
    trainer = MODPOTrainer(load_model(base), args=args, processing_class=load_tokenizer(base),
                           train_dataset=Dataset.from_list(tiny.rows(16, seed=6, num_margins=1)))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_same_seed_same_loss_curve(tmp_path, base):
    first = loss_curve(base, tmp_path / "a", seed=5)
    second = loss_curve(base, tmp_path / "b", seed=5)
    assert len(first) == 6 and all(math.isfinite(v) for v in first)
    assert first == second  # exactly, step by step
    assert loss_curve(base, tmp_path / "c", seed=6) != first  # the seed does decide something (the data order)


def test_seed_recorded_by_every_stage(capsys, tmp_path, base):
    """modpo_run.json and the model card of sft, reward, dpo and train outputs carry the training seed."""
    seed = 123
    pairs = write_jsonl(tmp_path / "pairs.jsonl", tiny.rows(4, seed=7))
    scored = write_jsonl(tmp_path / "scored.jsonl", tiny.rows(4, seed=8, num_margins=1))
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "completion": " " + r["chosen"]}
                                               for r in tiny.rows(4, seed=9)])
    training = {"use_cpu": True, "report_to": [], "disable_tqdm": True, "save_strategy": "no", "max_steps": 1,
                "per_device_train_batch_size": 2, "seed": seed}
    stages = {"sft": (sft, {}), "reward": (pairs, {"max_length": 32}), "dpo": (pairs, {}),
              "train": (scored, {"weights": [0.5, 0.5]})}
    for stage, (data, extra) in stages.items():
        out = tmp_path / stage
        config = write_yaml(tmp_path / f"{stage}.yaml", {"model": base, "output_dir": str(out), "train_data": data,
                                                         "training": {**training, **extra}})
        code, _, err = cli(capsys, stage, "--config", config)
        assert code == 0, f"{stage}: {err[-3000:]}"
        record = json.loads((out / "modpo_run.json").read_text())
        assert record["seed"] == seed and record["config"]["training"]["seed"] == seed, stage
        assert f"- seed: {seed}" in (out / "README.md").read_text().splitlines(), stage
