"""Writing toy-world datasets: scenes rendered by a pool of spawned workers into shards.

Used by `sdjax data toy` and by training configs that generate their data on first use.
The shards are byte-identical whatever the worker count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing
import time

from tqdm import tqdm

from sdjax import __version__
from sdjax.data import toy
from sdjax.data.shards import ShardWriter

CHUNK = 64  # scenes per task handed to a generator process


def worker_pool(workers: int):
    """A pool of `workers` spawned processes, or no pool (None) for one worker."""
    if workers <= 1:
        return contextlib.nullcontext()
    # Spawned, not forked: the parent may hold threads (tqdm's monitor, jax) fork would copy.
    return multiprocessing.get_context("spawn").Pool(workers)


def write_toy_dataset(
    out: str,
    n: int,
    *,
    seed: int = 0,
    size: int = 64,
    split: str = "train",
    workers: int = 2,
    records_per_shard: int = 1000,
    overwrite: bool = False,
) -> dict:
    """Render scenes 0..n-1 of the (seed, split) stream into shards at `out`.

    Returns {"shards": [...], "seconds": float} for the caller's summary.
    """
    world = toy.ToyWorld(size=size)
    provenance = {
        "generator": "toy",
        "sdjax_version": __version__,
        "seed": seed,
        "split": split,
        "world": dataclasses.asdict(world),
    }
    chunks = [(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
    encode = functools.partial(toy.encoded_scenes, world, seed, split)
    start = time.perf_counter()
    with (
        ShardWriter(out, records_per_shard, provenance, overwrite) as writer,
        worker_pool(min(workers, len(chunks))) as pool,
        tqdm(total=n, unit="scene", desc=f"toy {split}", disable=None) as bar,
    ):
        for encoded in pool.imap(encode, chunks) if pool else map(encode, chunks):
            for data in encoded:
                writer.write_encoded(data)
            bar.update(len(encoded))
    return {"shards": writer.shards, "seconds": time.perf_counter() - start}
