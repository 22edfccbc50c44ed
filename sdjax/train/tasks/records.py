"""A run's record folder: `data.path`, or (left empty) a toy world generated in the workdir
on first use. A `data.path` that names no record folder is an error, never generated into:
a mistyped path must not start a 20 000-scene generation."""

from __future__ import annotations

import time

import jax

from sdjax.errors import UserError


def prepare_data(config, workdir: str) -> str:
    """The dataset folder; a toy world is generated there first when it is missing."""
    from sdjax import paths
    from sdjax.data.shards import MANIFEST

    path = config.data.path or paths.join(workdir, "data")
    manifest = paths.join(path, MANIFEST)
    if paths.exists(manifest):
        return path
    toy_n = config.data.get("toy_n", 0)
    if config.data.path or not toy_n:
        hint = " (leave data.path empty to generate the toy world in WORKDIR/data)" * bool(toy_n)
        raise UserError(f"no record folder at data.path={path} (no {MANIFEST}){hint}")
    if jax.process_index() == 0:
        from sdjax.data.generate import write_toy_dataset

        print(f"generating the toy world ({toy_n} scenes) in {path}")
        write_toy_dataset(
            path,
            toy_n,
            seed=config.data.get("toy_seed", 0),
            size=config.data.get("toy_size", 64),
            overwrite=True,
        )
    while not paths.exists(manifest):  # other hosts wait for it
        time.sleep(1.0)
    return path
