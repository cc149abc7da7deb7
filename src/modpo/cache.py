"""Content-keyed disk cache for precomputed tensors (reference log-probs, margin rewards).

A cache entry's key is a hash of everything that determines its value: the model's weights, the data's
content and the settings. Entries are safetensors files written atomically (temporary file, then rename);
an entry that fails to load or whose stored key differs is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modpo.guard import entry_lock

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MODPO_CACHE", Path.home() / ".cache" / "modpo"))


def stable_hash(value) -> str:
    """sha256 of a JSON-serialisable value, with sorted keys."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model: torch.nn.Module, skip: Callable[[str], bool] = lambda name: False) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes and bytes): the model's identity."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if skip(name):
            continue
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# Config fields that do not change what a model computes (its dtype is keyed with the weights).
NOT_COMPUTE_CONFIG = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                      "_attn_implementation_autoset", "use_cache", "output_attentions", "output_hidden_states",
                      "return_dict")


def config_fingerprint(config) -> str | None:
    """Hash of a model config's settings (e.g. rope_theta, rms_norm_eps), without its name, version and dtype."""
    if config is None:
        return None
    values = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return stable_hash({k: v for k, v in values.items() if k not in NOT_COMPUTE_CONFIG})


def model_identity(model: torch.nn.Module, skip: Callable[[str], bool] = lambda name: False) -> dict:
    """What decides a model's outputs: its weights (`model_fingerprint`, minus `skip`), config and attention kernel."""
    config = getattr(model, "config", None)
    return {"weights": model_fingerprint(model, skip=skip), "config": config_fingerprint(config),
            "attention": getattr(config, "_attn_implementation", None)}


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides a tokenizer's output: vocabulary, special tokens and chat template."""
    return stable_hash({"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items()),
                        "special": tokenizer.special_tokens_map, "template": getattr(tokenizer, "chat_template", None),
                        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id})


def columns_fingerprint(dataset, columns: list[str]) -> str:
    """Hash of the given columns' content, row by row."""
    digest = hashlib.sha256()
    for batch in dataset.select_columns(columns).iter(batch_size=1024):
        digest.update(json.dumps([batch[c] for c in columns], default=str).encode())
    return digest.hexdigest()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def entry_path(kind: str, key: dict, cache_dir: Path | str | None = None) -> tuple[Path, str]:
    """Where the entry for (kind, key) lives, and the digest stored in it."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = stable_hash({"kind": kind, **key})
    return cache_dir / kind / f"{digest}.safetensors", digest


def lock_path(entry: Path) -> Path:
    """The lock file held while `entry` is computed: `<cache>/.locks/<kind>-<digest>.lock`, out of the entries' way."""
    return entry.parent.parent / ".locks" / f"{entry.parent.name}-{entry.stem}.lock"


def load_cached(kind: str, key: dict, cache_dir: Path | str | None = None) -> dict[str, torch.Tensor] | None:
    """The stored tensors for (kind, key), or None where there is no sound entry."""
    path, digest = entry_path(kind, key, cache_dir)
    if not path.exists():
        return None
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:  # the key is in the header metadata
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        if header.get("__metadata__", {}).get("key") == digest:
            logger.info("reusing cached %s from %s", kind, path)
            return tensors
        logger.warning("cache entry %s does not match its key; recomputing", path)
    except Exception as err:  # a torn or corrupted file: recompute, never trust it
        logger.warning("cache entry %s is unreadable (%s); recomputing", path, err)
    return None


def store_cached(kind: str, key: dict, tensors: dict[str, torch.Tensor],
                 cache_dir: Path | str | None = None) -> dict[str, torch.Tensor]:
    """Write the entry for (kind, key); returns the tensors as stored (contiguous, on CPU)."""
    path, digest = entry_path(kind, key, cache_dir)
    tensors = {name: t.contiguous().cpu() for name, t in tensors.items()}
    try:
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"key": digest, "kind": kind}))
    except OSError as err:  # a read-only or full cache: the run goes on, computing what it cannot keep
        root = str(path.parent.parent)
        if root not in _UNWRITABLE:
            _UNWRITABLE.add(root)
            logger.warning("cache %s is not writable (%s); computing without caching", root, err)
    return tensors


_UNWRITABLE: set[str] = set()  # cache folders already warned about


def cached_tensors(kind: str, key: dict, compute: Callable[[], dict[str, torch.Tensor]],
                   cache_dir: Path | str | None = None) -> dict[str, torch.Tensor]:
    """Load the entry for (kind, key) or compute and store it."""
    tensors = load_cached(kind, key, cache_dir)
    if tensors is not None:
        return tensors
    with entry_lock(lock_path(entry_path(kind, key, cache_dir)[0])):  # one process computes; the others wait, load
        tensors = load_cached(kind, key, cache_dir)
        return tensors if tensors is not None else store_cached(kind, key, compute(), cache_dir)
