"""Output folders and kept work: a run never writes into a folder it does not own, holds its folder's lock while it
works, computes a cache entry once across processes, and keeps (and names) its work when a write fails.

Each case runs through the CLI in-process (`modpo.cli.main`) as in tests/test_bad_input.py; the lock cases use a
second, real process. docs/reliability.md lists them ("Output folders, locks and failed writes").
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import tiny
from modpo import cache
from modpo.cli import interrupted_advice
from modpo.guard import LOCK_FILE
from tiny import run_cli as run, write_jsonl, write_yaml

TRAINING = {"use_cpu": True, "report_to": [], "save_strategy": "no", "max_steps": 1,
            "per_device_train_batch_size": 2, "disable_tqdm": True, "logging_steps": 1}
GOOD = [{"prompt": "p0 p1", "chosen": "a b", "rejected": "c d"},
        {"prompt": "p2", "chosen": "e f g", "rejected": "h"}]
HOLD_LOCK = ("import sys\nfrom filelock import FileLock\nlock = FileLock(sys.argv[1])\nlock.acquire()\n"
             "print('held', flush=True)\nsys.stdin.readline()\n")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    tok = tiny.tokenizer()
    return tiny.save(tiny.model(len(tok), seed=0), tok, tmp_path_factory.mktemp("base") / "lm")


def config(tmp_path: Path, base: str, out: Path, **training) -> str:
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    return write_yaml(tmp_path / "c.yaml", {"model": base, "output_dir": str(out), "train_data": data,
                                            "training": {**TRAINING, **training}, "dtype": "fp32"})


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("modpo: error: "), lines
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# ------------------------------------------------------------------------------------- folder guards


def test_a_model_folder_is_not_written_into(capsys, tmp_path, base):
    other = tiny.save(tiny.model(len(tiny.tokenizer()), seed=5), tiny.tokenizer(), tmp_path / "someones_model")
    before = snapshot(Path(other))
    code, out, err = run(capsys, "dpo", "--config", config(tmp_path, base, Path(other)))
    line = one_error(err)
    assert code == 2 and out == ""
    assert f"output_dir {other} already holds a model modpo did not write (config.json" in line
    assert "pass --overwrite" in line
    assert snapshot(Path(other)) == before and not (Path(other) / LOCK_FILE).exists()


def test_a_folder_of_other_files_is_not_written_into_unless_overwrite(capsys, tmp_path, base):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine\n")
    code, _, err = run(capsys, "dpo", "--config", config(tmp_path, base, out))
    assert code == 2 and f"output_dir {out} already holds files modpo did not write (todo.txt)" in one_error(err)
    code, stdout, _ = run(capsys, "dpo", "--config", config(tmp_path, base, out), "--overwrite")
    assert code == 0 and f"saved to {out}" in stdout
    assert (out / "todo.txt").read_text() == "mine\n" and (out / "modpo_run.json").exists()


def test_the_runs_own_input_model_folder_is_refused(capsys, tmp_path, base):
    own = Path(tiny.save(tiny.model(len(tiny.tokenizer()), seed=6), tiny.tokenizer(), tmp_path / "own"))
    before = snapshot(own)
    code, _, err = run(capsys, "dpo", "--config", config(tmp_path, str(own), own))
    assert code == 2
    assert f"output_dir {own} is this run's own model folder; writing there would replace its input" in one_error(err)
    assert snapshot(own) == before


def test_an_empty_folder_and_a_finished_run_are_the_runs_own(capsys, tmp_path, base):
    out = tmp_path / "empty"
    out.mkdir()
    cfg = config(tmp_path, base, out)
    assert run(capsys, "dpo", "--config", cfg)[0] == 0
    assert (out / LOCK_FILE).exists()  # left behind: it marks the folder as modpo's
    code, stdout, _ = run(capsys, "dpo", "--config", cfg)  # the same run again: reused, not refused
    assert code == 0 and f"saved to {out}" in stdout


# -------------------------------------------------------------------------------------------- locks


def holder(lock_path: Path) -> subprocess.Popen:
    """Another process holding `lock_path` until it is told to stop (a line on its stdin)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock_path)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def release(process: subprocess.Popen) -> None:
    process.stdin.write("\n")
    process.stdin.flush()
    assert process.wait(timeout=60) == 0


def test_a_second_run_into_a_folder_in_use_is_refused_at_once(capsys, tmp_path, base):
    out = tmp_path / "busy"
    out.mkdir()
    other = holder(out / LOCK_FILE)  # a second process, as a run working in `out`
    try:
        code, stdout, err = run(capsys, "dpo", "--config", config(tmp_path, base, out))
    finally:
        release(other)
    assert code == 2 and stdout == ""
    assert one_error(err) == (f"modpo: error: output_dir {out} is in use by another modpo run (it holds "
                              f"{out / LOCK_FILE}); wait for it to finish or choose another output_dir")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    code, stdout, _ = run(capsys, "dpo", "--config", config(tmp_path, base, out))  # once the other is done
    assert code == 0 and (out / "model.safetensors").exists()


def test_two_runs_into_one_folder_one_proceeds_the_other_is_refused(capsys, tmp_path, base):
    """Two real `modpo dpo` runs into one output_dir: the first (a separate process) trains; the second, started
    while the first holds the folder, is refused in one line and writes nothing; the first finishes normally."""
    out = tmp_path / "shared_out"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first_config = config(tmp_path / "a", base, out, max_steps=40, logging_steps=1000)
    second_config = config(tmp_path / "b", base, out)
    first = subprocess.Popen([sys.executable, "-m", "modpo.cli", "dpo", "--config", first_config],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while not (out / LOCK_FILE).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()
    code, stdout, err = run(capsys, "dpo", "--config", second_config)
    first_out, first_err = first.communicate(timeout=300)
    assert code == 2 and stdout == "" and "is in use by another modpo run" in one_error(err)
    assert first.returncode == 0, first_err
    assert first_out.strip().splitlines()[-1] == f"saved to {out}" and (out / "model.safetensors").exists()


def test_a_cache_entry_being_computed_elsewhere_is_waited_for_not_recomputed(tmp_path, monkeypatch):
    key = {"what": "reference", "rows": 3}
    path, _ = cache.entry_path("logps", key, tmp_path)
    cache.lock_path(path).parent.mkdir(parents=True)
    other = holder(cache.lock_path(path))  # another process computing this entry
    waiting = threading.Event()
    real_lock = cache.entry_lock

    def entry_lock(where):
        waiting.set()
        return real_lock(where)

    monkeypatch.setattr(cache, "entry_lock", entry_lock)
    computed, result = [], {}
    worker = threading.Thread(target=lambda: result.update(cache.cached_tensors(
        "logps", key, lambda: computed.append(1) or {"x": torch.zeros(3)}, tmp_path)))
    worker.start()
    assert waiting.wait(timeout=60)  # it found no entry and went for the lock
    cache.store_cached("logps", key, {"x": torch.arange(3.0)}, tmp_path)  # the other process's result
    release(other)
    worker.join(timeout=60)
    assert computed == [] and torch.equal(result["x"], torch.arange(3.0))


# ------------------------------------------------------------------------------------- failed writes


def test_an_unwritable_cache_warns_once_and_computes(tmp_path, caplog):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    calls = []
    with caplog.at_level(logging.WARNING, logger="modpo.cache"):
        for rows in (1, 2):
            out = cache.cached_tensors("logps", {"rows": rows}, lambda: calls.append(1) or {"x": torch.ones(2)},
                                       blocked / "cache")
            assert torch.equal(out["x"], torch.ones(2))
    assert calls == [1, 1]
    warnings = [r.getMessage() for r in caplog.records if "not writable" in r.getMessage()]
    assert len(warnings) == 1 and f"cache {blocked / 'cache'} is not writable" in warnings[0]
    assert "computing without caching" in warnings[0]


def test_a_failed_final_save_keeps_the_last_checkpoint_and_says_where(capsys, tmp_path, base, monkeypatch):
    from transformers import Trainer

    real_save = Trainer.save_model

    def disk_full(self, output_dir=None, _internal_call=False):
        if not _internal_call:  # checkpoints save; the final save finds the disk full
            raise OSError(28, "No space left on device")
        return real_save(self, output_dir, _internal_call)

    monkeypatch.setattr(Trainer, "save_model", disk_full)
    out = tmp_path / "out"
    cfg = config(tmp_path, base, out, max_steps=2, save_strategy="steps", save_steps=1)
    code, stdout, err = run(capsys, "dpo", "--config", cfg)
    assert code == 1 and "saved to" not in stdout
    assert one_error(err) == (f"modpo: error: could not save the final model in {out} (No space left on device); "
                              f"the last checkpoint, {out / 'checkpoint-2'}, is kept: free space and rerun with "
                              "--resume to continue from it")
    assert (out / "checkpoint-2" / "trainer_state.json").exists() and not (out / "modpo_run.json").exists()
    monkeypatch.setattr(Trainer, "save_model", real_save)
    code, stdout, _ = run(capsys, "dpo", "--config", cfg, "--resume")  # as the message says
    assert code == 0 and (out / "modpo_run.json").exists()


# ------------------------------------------------------------------------------------------- Ctrl-C


def test_interruption_names_the_command_that_continues(tmp_path):
    out = tmp_path / "run"
    assert interrupted_advice(["dpo", "--config", "c.yaml"], str(out)) == (
        "modpo: interrupted; no checkpoint was written yet; start again with: modpo dpo --config c.yaml")
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert interrupted_advice(["dpo", "--config", "c.yaml", "training.beta=0.2"], str(out)) == (
        "modpo: interrupted; continue from the last checkpoint with: modpo dpo --config c.yaml training.beta=0.2 "
        "--resume")
    assert interrupted_advice(["front", "--config", "my front.yaml"]) == (
        "modpo: interrupted; continue from the last checkpoint with: modpo front --config 'my front.yaml' --resume")
    assert interrupted_advice(["recipe", "pku_safety", "--resume"]).endswith(": modpo recipe pku_safety --resume")
    assert interrupted_advice(["demo", "--output-dir", "d"]) == (
        "modpo: interrupted; rerun (finished work is reused) with: modpo demo --output-dir d")


def test_ctrl_c_prints_the_advice_and_exits_130(capsys, tmp_path, base, monkeypatch):
    from modpo import stages

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "load_model", interrupt)
    monkeypatch.setattr(stages, "load_tokenizer", interrupt)
    cfg = config(tmp_path, base, tmp_path / "out")
    code, _, err = run(capsys, "dpo", "--config", cfg)
    assert code == 130
    assert err.strip().splitlines()[-1] == ("modpo: interrupted; no checkpoint was written yet; start again with: "
                                            f"modpo dpo --config {cfg}")
