"""The training input pipeline: a record folder -> batches for the Subject-Diffusion train step.

    loader = make_loader(LoaderConfig.from_dict(config.data), model_config, tokenizer,
                         batch_size=8, seed=0)
    batch = next(loader)        # dict of numpy arrays, leading dim = batch_size
    state = loader.get_state()  # JSON-serialisable; set_state(state) resumes exactly

Each process gets `batch_size` examples per batch (its local share of the global batch),
shaped as `sdjax.data.transforms` describes (image, refs, boxes, valid, use_box, ids,
placeholders, label_positions, masks, regions, drop_text / drop_loc / drop_objs, noise_seed).

The grain graph: RecordSource -> seed -> shuffle (a fresh permutation per epoch) ->
random_map(ExampleTransform) -> [process_index::process_count] -> repeat(num_epochs) ->
to_iter_dataset (drops corrupt records, which the source returns as None) ->
batch(drop_remainder) -> optional mp_prefetch. The random map sits before the per-process
slice, so an example's augmentation depends only on (seed, epoch, position in the epoch's
permutation): the same whatever the process count. Processes see disjoint slices that
together cover each epoch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grain
import numpy as np

from sdjax.data.shards import RecordSource
from sdjax.data.transforms import ExampleConfig, ExampleTransform, Geometry
from sdjax.errors import UserError
from sdjax.tokenizer import Tokenizer

if TYPE_CHECKING:
    from sdjax.subject_diffusion import ModelConfig

STATE_FORMAT = "sdjax-loader-1"
_INT_KEYS = "__int_keys__"  # JSON objects only have string keys; grain's state has int keys
_MINIMA = {"worker_count": 0, "read_threads": 1, "prefetch_buffer": 1}


@dataclass(frozen=True)
class LoaderConfig:
    """The `data` config keys the input pipeline reads: where and how records are read
    here, how each becomes an example in `example` (`sdjax.data.transforms.ExampleConfig`).

    path: record folder. shuffle: a new permutation each epoch. worker_count: grain worker
    processes (0: threads in this process). read_threads / prefetch_buffer: threads and
    elements read ahead per process or worker.
    """

    path: str
    shuffle: bool = True
    worker_count: int = 0
    read_threads: int = 4
    prefetch_buffer: int = 64
    example: ExampleConfig = ExampleConfig()

    def __post_init__(self):
        for name, least in _MINIMA.items():
            if getattr(self, name) < least:
                raise UserError(f"data.{name} must be >= {least}, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: Mapping) -> LoaderConfig:
        """From a config's flat `data` section (a dict or ConfigDict); keys that are
        neither the loader's nor the examples' are ignored (the toy world's, for one)."""
        items = data.to_dict() if hasattr(data, "to_dict") else dict(data)
        if "path" not in items:
            raise UserError("data.path is required")
        own, example = _field_names(cls) - {"example"}, _field_names(ExampleConfig)
        return cls(
            **{k: v for k, v in items.items() if k in own},
            example=ExampleConfig(**{k: v for k, v in items.items() if k in example}),
        )


def data_keys() -> set[str]:
    """Every `data` key the input pipeline reads."""
    return (_field_names(LoaderConfig) - {"example"}) | _field_names(ExampleConfig)


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _jsonable(state):
    """grain iterator state -> JSON-safe values (dicts with int keys are tagged)."""
    if isinstance(state, Mapping):
        if all(isinstance(k, str) for k in state):
            return {k: _jsonable(v) for k, v in state.items()}
        return {_INT_KEYS: [[int(k), _jsonable(v)] for k, v in state.items()]}
    if isinstance(state, list | tuple):
        return [_jsonable(v) for v in state]
    if isinstance(state, np.generic):
        return state.item()
    return state


def _from_jsonable(state):
    if isinstance(state, Mapping):
        if set(state) == {_INT_KEYS}:
            return {k: _from_jsonable(v) for k, v in state[_INT_KEYS]}
        return {k: _from_jsonable(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_from_jsonable(v) for v in state]
    return state


class Loader(Iterator[dict]):
    """An iterator of batches with a checkpointable position; close() stops its workers."""

    def __init__(self, dataset: grain.IterDataset, source: RecordSource, layout: dict):
        self._iterator = iter(dataset)
        self._source = source
        self.layout = layout  # what a saved state is only valid for

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    @property
    def corrupt_count(self) -> int:
        """Corrupt records skipped in this process (worker processes count and log their own)."""
        return self._source.corrupt_count

    def get_state(self) -> dict:
        """The position after the batches returned so far, as JSON-serialisable values."""
        state = _jsonable(self._iterator.get_state())
        return {"format": STATE_FORMAT, "layout": dict(self.layout), "grain": state}

    def set_state(self, state: Mapping) -> None:
        """Continue from `state` (from `get_state` of a loader built the same way)."""
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"not a data loader state (format {state.get('format')!r})")
        if dict(state["layout"]) != self.layout:
            raise UserError(
                f"data loader state was saved with {dict(state['layout'])}, "
                f"this loader has {self.layout}: it cannot resume exactly"
            )
        self._iterator.set_state(_from_jsonable(state["grain"]))

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_loader(
    data_config: LoaderConfig,
    model_config: ModelConfig,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int | None = None,
    num_epochs: int | None = None,
) -> Loader:
    """Subject-Diffusion batches of `batch_size` examples for this process (module doc)."""
    transform = ExampleTransform(data_config.example, Geometry.of(model_config), tokenizer)
    return make_record_loader(
        data_config,
        transform,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        worker_count=worker_count,
        num_epochs=num_epochs,
    )


def make_record_loader(
    data_config: LoaderConfig,
    transform: grain.transforms.RandomMap,
    *,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int | None = None,
    num_epochs: int | None = None,
) -> Loader:
    """Batches of `transform(record, rng)` examples (the graph of the module docstring).

    process_index / process_count default to jax's; worker_count to the config's;
    num_epochs None repeats forever. Batches never straddle a short final one: the
    remainder of the last epoch is dropped.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise UserError(f"process index {process_index} is outside 0..{process_count - 1}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    workers = data_config.worker_count if worker_count is None else worker_count
    source = RecordSource(data_config.path)

    dataset = grain.MapDataset.source(source).seed(seed)
    if data_config.shuffle:
        dataset = dataset.shuffle()
    dataset = dataset.random_map(transform)[process_index::process_count]
    dataset = dataset.repeat(num_epochs)
    read = grain.ReadOptions(
        num_threads=data_config.read_threads, prefetch_buffer_size=data_config.prefetch_buffer
    )
    batches = dataset.to_iter_dataset(read).batch(batch_size, drop_remainder=True)
    if workers > 0:
        _allow_grain_workers()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    layout = {
        "seed": seed,
        "batch_size": batch_size,
        "process_index": process_index,
        "process_count": process_count,
        "worker_count": workers,
    }
    return Loader(batches, source, layout)


def _allow_grain_workers() -> None:
    """grain's workers read an absl flag, which fails unless flags count as parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
