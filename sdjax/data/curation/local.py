"""The single-process curation runner: small inputs, laptops, tests.

Block after block: read, load, cut into batches, `stages.curate_batch` on each, write the
block's shard (`output.py`). Resumable: a rerun of the same command skips finished blocks
and redoes the one that was cut off, so a crash loses at most one block. Beam's runner
(`beam.py`) runs the same stages with the same batches and writes the same shards.
"""

from __future__ import annotations

import dataclasses
import json

from sdjax.data.curation import output, sources
from sdjax.data.curation.stages import (
    CurationConfig,
    StageClock,
    Stages,
    batches,
    curate_batch,
    load,
    split,
)
from sdjax.data.filters import FilterReport

DEFAULT_CONFIG = CurationConfig()


def plan(config: CurationConfig, described: dict) -> dict:
    """What an unfinished curation must match to be resumed: settings and input."""
    # through JSON, as read back from plan.json (tuples become lists)
    return json.loads(json.dumps({"config": dataclasses.asdict(config), "input": described}))


def curate_units(
    units: list[sources.Unit],
    described: dict,
    stages: Stages,
    out_dir: str,
    config: CurationConfig = DEFAULT_CONFIG,
    provenance: dict | None = None,
    overwrite: bool = False,
    clock: StageClock | None = None,
) -> FilterReport:
    """Curates the units into the record folder `out_dir`, resuming an unfinished run."""
    from tqdm import tqdm

    clock = clock or StageClock()
    done = output.prepare(out_dir, plan(config, described), overwrite)
    results = list(done.values())
    skip = frozenset(done)
    with tqdm(unit="image", desc="curate", disable=None) as bar:
        for unit in units:
            for block, raws in _blocks(sources.read_unit(unit, config.chunk_size, skip), clock):
                outcomes, loaded = [], []
                with clock("load", len(raws)):
                    loaded = split([load(raw, config) for raw in raws], outcomes)
                for batch in batches(loaded, config.batch_size):
                    outcomes += curate_batch(batch, stages, config, clock)
                with clock("write", len(raws)):
                    results.append(output.write_block(out_dir, block, outcomes))
                bar.update(len(raws))
    return output.finish(out_dir, results, {**(provenance or {}), **plan(config, described)})


def _blocks(raws, clock):
    """(block, its raws) in reading order, timing the reading."""
    block, group = None, []
    iterator = iter(raws)
    while True:
        with clock("read", 0):
            raw = next(iterator, None)
        if raw is None or (group and raw.block != block):
            if group:
                clock.images["read"] += len(group)
                yield block, group
            if raw is None:
                return
            group = []
        block = raw.block
        group.append(raw)


def curate(
    items: list[tuple[str, bytes | str]],
    stages: Stages,
    out_dir: str,
    config: CurationConfig = DEFAULT_CONFIG,
    provenance: dict | None = None,
    overwrite: bool = False,
    clock: StageClock | None = None,
) -> FilterReport:
    """Curates (source id, image bytes or path) items into the record folder `out_dir`."""
    units = sources.listing_units(list(items), config.chunk_size)
    described = sources.items_description(list(items))
    return curate_units(units, described, stages, out_dir, config, provenance, overwrite, clock)
