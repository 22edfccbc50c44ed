"""The input position saved with a checkpoint resumes with another process count.

Real grain loaders over a toy record folder (the loader's own graph, with a transform that
only tags each example with its record and a random draw): the loaders of the new layout,
given the converted position, yield what the old layout's loaders would have yielded next.
"""

import grain
import numpy as np
import pytest

from sdjax.data.generate import write_toy_dataset
from sdjax.data.loader import LoaderConfig, make_record_loader
from sdjax.train.data_position import resume_state, saved_position

SEED = 3
GLOBAL_BATCH = 8


class Tag(grain.transforms.RandomMap):
    """An example = its record's id and one draw of its rng (standing for augmentation)."""

    def random_map(self, record, rng):
        return {"id": np.asarray(record.source_id), "draw": np.float64(rng.random())}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("toy_records"))
    write_toy_dataset(path, 64, size=32, workers=1, overwrite=True)
    return path


def loaders(data_dir, count, workers=0):
    config = LoaderConfig(path=data_dir, worker_count=workers, read_threads=1, prefetch_buffer=1)
    return [
        make_record_loader(
            config,
            Tag(),
            batch_size=GLOBAL_BATCH // count,
            seed=SEED,
            process_index=i,
            process_count=count,
        )
        for i in range(count)
    ]


def global_batches(group, steps) -> list[set]:
    """The next `steps` global batches of a group of per-process loaders, as sets of
    (record, draw): the order inside a global batch does not change the loss."""
    out = []
    for _ in range(steps):
        batch = set()
        for loader in group:
            b = next(loader)
            batch |= {(str(i), float(d)) for i, d in zip(b["id"], b["draw"])}
        out.append(batch)
    return out


@pytest.mark.parametrize("old_count,new_count", [(2, 1), (1, 4), (4, 2)])
def test_position_converts_exactly_across_process_counts(data_dir, old_count, new_count):
    steps_done = 11  # 88 examples: past the first epoch of 64
    old = loaders(data_dir, old_count)
    global_batches(old, steps_done)
    saved = saved_position([ld.get_state() for ld in old], steps_done, GLOBAL_BATCH)
    expected = global_batches(old, 3)

    new = loaders(data_dir, new_count)
    for loader in new:
        loader.set_state(resume_state(saved, loader.layout, steps_done))
    assert global_batches(new, 3) == expected


def test_same_layout_restores_each_process_state(data_dir):
    old = loaders(data_dir, 2)
    global_batches(old, 5)
    saved = saved_position([ld.get_state() for ld in old], 5, GLOBAL_BATCH)
    for index, loader in enumerate(loaders(data_dir, 2)):
        assert resume_state(saved, loader.layout, 5) == saved["processes"][index]


@pytest.mark.slow  # spawns grain worker processes (~15 s)
def test_grain_workers_start_where_the_new_layout_would_be(data_dir):
    # With worker processes a global batch depends on the layout anyway: the new layout
    # starts at its own position after the same number of steps.
    old = loaders(data_dir, 2)
    global_batches(old, 5)
    saved = saved_position([ld.get_state() for ld in old], 5, GLOBAL_BATCH)
    (resumed,) = loaders(data_dir, 1, workers=2)
    (fresh,) = loaders(data_dir, 1, workers=2)
    try:
        resumed.set_state(resume_state(saved, resumed.layout, 5))
        global_batches([fresh], 5)
        assert global_batches([resumed], 3) == global_batches([fresh], 3)
    finally:
        resumed.close()
        fresh.close()
