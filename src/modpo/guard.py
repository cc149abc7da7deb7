"""Output folders a run may write into, and one run at a time in each.

A command writes only into a folder that is new, empty, or already modpo's own (a run record, checkpoints, a
front's points, or the lock file a run leaves there). A folder holding anything else (a model someone saved, the
run's own input model, unrelated files) is refused unless `--overwrite`. While a run works in its folder it
holds `output_dir/.modpo.lock`; a second run into the same folder is refused at once, in one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from modpo.errors import ConfigError, WriteError

logger = logging.getLogger(__name__)

LOCK_FILE = ".modpo.lock"
# What a modpo command leaves in its output folder (besides the model files a finished run records).
OWN_MARKERS = ("modpo_run.json", LOCK_FILE, "front.json", "points", "evaluation.json")
OWN_PATTERNS = ("checkpoint-*",)
MIN_FREE_BYTES = 64 << 20  # refuse to start a run into a disk with less than this free


def is_modpo_folder(folder: Path) -> bool:
    """True if `folder` was written by a modpo command (a run record, its lock, checkpoints or front points)."""
    return any((folder / name).exists() for name in OWN_MARKERS) or any(
        any(folder.glob(pattern)) for pattern in OWN_PATTERNS)


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_folder(output_dir: str, overwrite: bool, inputs: Iterable[tuple[str, str]] = ()) -> None:
    """Refuse (one line) an output folder that is one of the run's input folders (`inputs`: (config key, path)),
    or that holds files modpo did not write, unless `overwrite`."""
    out = Path(output_dir).expanduser()
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"output_dir {output_dir} is a file, not a folder")
    for key, path in inputs:
        if isinstance(path, str) and path and _same_folder(out, Path(path).expanduser()):
            raise ConfigError(f"output_dir {output_dir} is this run's own {key} folder; writing there would replace "
                              "its input: choose another output_dir or pass --overwrite")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not is_modpo_folder(out):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        what = "a model" if (out / "config.json").exists() else "files"
        raise ConfigError(f"output_dir {output_dir} already holds {what} modpo did not write ({shown}); choose "
                          "another output_dir or pass --overwrite")


def check_writable(output_dir: str, min_free: int = MIN_FREE_BYTES) -> None:
    """The output folder (or the nearest existing folder above it) is writable and has `min_free` bytes free."""
    where = Path(output_dir).expanduser().absolute()
    while not where.exists():
        where = where.parent
    if not where.is_dir():
        raise ConfigError(f"output_dir {output_dir}: {where} is a file, not a folder")
    if not os.access(where, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {output_dir}: {where} is not writable")
    free = shutil.disk_usage(where).free
    if free < min_free:
        raise ConfigError(f"output_dir {output_dir}: only {free >> 20} MiB free on the disk holding {where} "
                          f"(at least {min_free >> 20} MiB needed)")


@contextlib.contextmanager
def output_lock(output_dir: str) -> Iterator[None]:
    """Hold `output_dir/.modpo.lock` for the block (the folder is created); another holder means another run."""
    out = Path(output_dir).expanduser()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(f"output_dir {output_dir} is in use by another modpo run (it holds {out / LOCK_FILE}); "
                          "wait for it to finish or choose another output_dir") from None
    try:
        yield
    except BaseException:
        if created and [p.name for p in out.iterdir()] == [LOCK_FILE]:  # the run failed before writing anything
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        lock.release()


@contextlib.contextmanager
def entry_lock(path: Path) -> Iterator[bool]:
    """Hold the lock file `path` while a cache entry is computed, so two processes do not compute the same entry at
    once. Yields False (and holds nothing) where the lock file cannot be made: the caller computes without it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        lock.acquire()
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (one holding trainer_state.json, which transformers writes last), if any."""
    steps = [(int(p.name.removeprefix("checkpoint-")), p) for p in Path(output_dir).glob("checkpoint-*")
             if p.name.removeprefix("checkpoint-").isdigit() and (p / "trainer_state.json").is_file()]
    return max(steps)[1] if steps else None


def save_failed(output_dir: str | Path, err: OSError) -> WriteError:
    """The one-line error for a final save that failed: where the last checkpoint is, or that there is none."""
    reason = err.strerror or str(err) or type(err).__name__
    checkpoint = last_checkpoint(output_dir)
    kept = (f"the last checkpoint, {checkpoint}, is kept: free space and rerun with --resume to continue from it"
            if checkpoint else "no checkpoint was written (save_strategy 'no' or before the first save_steps): "
                               "free space and run again")
    return WriteError(f"could not save the final model in {output_dir} ({reason}); {kept}")
