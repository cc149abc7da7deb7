"""Precomputes (reference log-probs, margin rewards) split over the processes of a distributed run.

Every process scores one contiguous shard of the rows; the shards are gathered in rank order and the main
process (rank 0) writes the one cache entry. Where every process finds the entry, none computes. In a
single process this is `cache.cached_tensors` over all rows, unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from modpo.cache import cached_tensors, load_cached, store_cached

logger = logging.getLogger(__name__)


def process_group() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside a distributed run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(num_rows: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous share of `num_rows` rows; the first `num_rows % world_size` ranks get one more."""
    per_rank, extra = divmod(num_rows, world_size)
    start = rank * per_rank + min(rank, extra)
    return range(start, start + per_rank + (1 if rank < extra else 0))


def sharded_cached_tensors(kind: str, key: dict, compute_rows: Callable[[range], dict[str, torch.Tensor]],
                           num_rows: int, cache_dir: Path | str | None = None) -> dict[str, torch.Tensor]:
    """The cache entry for (kind, key), computed where missing by `compute_rows(rows)` on every process's shard.

    `compute_rows(rows)` returns tensors whose first dimension runs over `rows`. Every process must call this
    with the same kind, key and number of rows (it joins collective calls).
    """
    rank, world_size = process_group()
    if world_size == 1:
        return cached_tensors(kind, key, lambda: compute_rows(range(num_rows)), cache_dir)
    found = load_cached(kind, key, cache_dir)
    everyone = [None] * world_size
    dist.all_gather_object(everyone, found is not None)
    if all(everyone):
        return found
    rows = shard(num_rows, rank, world_size)
    logger.info("%s: process %d of %d scores rows %d..%d", kind, rank, world_size, rows.start, rows.stop - 1)
    local = {name: tensor.detach().cpu() for name, tensor in compute_rows(rows).items()}
    pieces = [None] * world_size
    dist.all_gather_object(pieces, local)
    tensors = {name: torch.cat([piece[name] for piece in pieces]) for name in local}
    if rank == 0:
        tensors = store_cached(kind, key, tensors, cache_dir)
    dist.barrier()  # the entry exists for everyone once this returns
    return tensors
