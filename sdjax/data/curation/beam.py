"""Curation as an Apache Beam pipeline: the same stages and shards as `local.py`, at scale.

    units -> Read (read, load, cut batches) -> Reshuffle -> Caption [RunInference]
      -> Nouns -> Detect [RunInference] -> Select -> Segment [RunInference] -> Record
      -> every image's Outcome, grouped by block -> Write (one shard per block)
      -> all blocks' results -> Finish (report.json, then the manifest)

Batches are cut by the Read step from each block's loaded images, exactly as the
single-process runner cuts them, and RunInference runs each batch as it comes
(`with_no_batching`): the model sees the same batches on any runner, so the output is the
same bit for bit. The model steps are `StepHandler`s, RunInference model handlers around
the adapters of `models.py` (loaded once per worker process, on its GPU when it has one).
Images dropped by a step leave as `Outcome`s on a side output.

Restartability comes from the output's layout (`output.py`): shards are named by block and
written whole and idempotently, so a retried bundle or a rerun job writes the same bytes; a
rerun of a killed job skips the blocks already written and lists only whole shards.

Metrics (namespace `sdjax.curate`): the counts of `report.json` as counters
(`images_seen`, `images_kept`, `subjects_kept`, `dropped_images.REASON`,
`dropped_subjects.REASON`), and per step `STEP.images` (counter) and `STEP.us` (a
distribution of microseconds per call; a model step's call is one batch).

Pipeline options are Beam's own: with none, the DirectRunner on every local core
(multi-processing); `--runner=DataflowRunner --project ... --region ... --temp_location
gs://...` (and a worker container with sdjax: README) runs it on Dataflow, likewise Flink
and Spark with their options.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import ModelHandler, RunInference
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from sdjax import paths
from sdjax.data.curation import output, sources, stages
from sdjax.data.curation.local import plan
from sdjax.data.curation.stages import CurationConfig, Item, Outcome, StageClock
from sdjax.data.filters import FilterReport
from sdjax.data.nouns import caption_nouns

NAMESPACE = "sdjax.curate"
DONE = "done"  # the side output of dropped images' outcomes
_MODEL_STEPS = {"caption": stages.caption, "detect": stages.detect, "segment": stages.segment}


def _timed(step: str, start: float, images: int) -> None:
    Metrics.distribution(NAMESPACE, f"{step}.us").update(int((time.perf_counter() - start) * 1e6))
    Metrics.counter(NAMESPACE, f"{step}.images").inc(images)


@dataclass(frozen=True)
class ModelSteps:
    """How each worker builds its three models: picklable factories of no argument (e.g.
    `functools.partial(models.Blip2Captioner, path, device="auto")`)."""

    captioner: Callable
    detector: Callable
    segmenter: Callable
    nouns: Callable = caption_nouns


class StepHandler(ModelHandler):
    """RunInference's model handler for one model step (caption, detect or segment).

    `load_model` builds the adapter on the worker; `run_inference` runs the step on one
    batch of items and returns it advanced (one output element per batch)."""

    def __init__(self, step: str, factory: Callable):
        super().__init__()
        self._step, self._factory = step, factory

    def load_model(self):
        return self._factory()

    def run_inference(self, batch, model, inference_args=None):
        start = time.perf_counter()
        advanced = _MODEL_STEPS[self._step](list(batch), model)
        _timed(self._step, start, len(batch))
        return [tuple(advanced)]

    def get_num_bytes(self, batch) -> int:
        return sum(len(item.data) for item in batch)

    def get_metrics_namespace(self) -> str:
        return f"{NAMESPACE}.{self._step}"


class ReadBatches(beam.DoFn):
    """A unit's images: read, loaded, and cut into batches per block (as `local.py`)."""

    def __init__(self, config: CurationConfig, skip: frozenset):
        self._config, self._skip = config, skip

    def process(self, unit: sources.Unit):
        block, loaded = None, []
        start = time.perf_counter()
        for raw in sources.read_unit(unit, self._config.chunk_size, self._skip):
            _timed("read", start, 1)
            if raw.block != block:
                yield from self._batches(loaded)
                block, loaded = raw.block, []
            start = time.perf_counter()
            item = stages.load(raw, self._config)
            _timed("load", start, 1)
            if isinstance(item, Outcome):
                yield beam.pvalue.TaggedOutput(DONE, item)
            else:
                loaded.append(item)
            start = time.perf_counter()
        yield from self._batches(loaded)

    def _batches(self, loaded: list[Item]):
        yield from stages.batches(loaded, self._config.batch_size)


class EachItem(beam.DoFn):
    """A per-image step over a batch: the items that go on as a batch, the rest as outcomes."""

    def __init__(self, step: str, function: Callable, *args):
        self._step, self._function, self._args = step, function, args

    def process(self, batch: tuple[Item, ...]):
        start = time.perf_counter()
        results = [self._function(item, *self._args) for item in batch]
        _timed(self._step, start, len(batch))
        for result in results:
            if isinstance(result, Outcome):
                yield beam.pvalue.TaggedOutput(DONE, result)
        going_on = tuple(r for r in results if isinstance(r, Item))
        if going_on:
            yield going_on


def _write(block_and_outcomes, out_dir: str) -> dict:
    block, outcomes = block_and_outcomes
    outcomes = list(outcomes)
    start = time.perf_counter()
    result = output.write_block(out_dir, tuple(block), outcomes)
    _timed("write", start, len(outcomes))
    report = result["report"]
    for name in ("images_seen", "images_kept", "subjects_kept"):
        Metrics.counter(NAMESPACE, name).inc(report[name])
    for kind in ("dropped_images", "dropped_subjects"):
        for reason, count in report[kind].items():
            Metrics.counter(NAMESPACE, f"{kind}.{reason}").inc(count)
    return result


def _finish(results: list[dict], out_dir: str, done: list[dict], provenance: dict) -> dict:
    return output.finish(out_dir, [*done, *results], provenance).as_dict()


def build(
    pipeline: beam.Pipeline,
    units: list[sources.Unit],
    models: ModelSteps,
    config: CurationConfig,
    out_dir: str,
    done: dict,
    provenance: dict,
) -> None:
    """Adds the curation of `units` into `out_dir` to `pipeline` (blocks in `done` skipped)."""

    def model_step(name: str, factory: Callable):
        return name.capitalize() >> RunInference(StepHandler(name, factory).with_no_batching())

    read = (
        pipeline
        | "Units" >> beam.Create(units)
        | "Read" >> beam.ParDo(ReadBatches(config, frozenset(done))).with_outputs(DONE, main="go")
    )
    captioned = read.go | "Spread" >> beam.Reshuffle() | model_step("caption", models.captioner)
    nouned = captioned | "Nouns" >> beam.ParDo(
        EachItem("nouns", stages.find_nouns, models.nouns)
    ).with_outputs(DONE, main="go")
    detected = nouned.go | model_step("detect", models.detector)
    selected = detected | "Select" >> beam.ParDo(EachItem("select", stages.select)).with_outputs(
        DONE, main="go"
    )
    segmented = selected.go | model_step("segment", models.segmenter)
    recorded = segmented | "Record" >> beam.ParDo(
        EachItem("record", stages.to_record, config)
    ).with_outputs(DONE, main="go")
    (
        (read[DONE], nouned[DONE], selected[DONE], recorded[DONE])
        | "Outcomes" >> beam.Flatten()
        | "ByBlock" >> beam.Map(lambda outcome: (outcome.block, outcome))
        | "Group" >> beam.GroupByKey()
        | "Write" >> beam.Map(_write, out_dir)
        | "All" >> beam.combiners.ToList()
        | "Finish" >> beam.Map(_finish, out_dir, list(done.values()), provenance)
    )


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    """Beam's options from the command line; with no runner named, the DirectRunner on every
    local core (one worker process per core)."""
    options = PipelineOptions(beam_args)
    if options.view_as(StandardOptions).runner is None:
        options.view_as(StandardOptions).runner = "DirectRunner"
        direct = options.view_as(DirectOptions)
        if "--direct_num_workers" not in " ".join(beam_args):
            direct.direct_num_workers = os.cpu_count() or 1
            direct.direct_running_mode = "multi_processing"
    return options


def curate_units(
    units: list[sources.Unit],
    described: dict,
    models: ModelSteps,
    out_dir: str,
    config: CurationConfig,
    beam_args: list[str] = (),
    provenance: dict | None = None,
    overwrite: bool = False,
    clock: StageClock | None = None,
) -> FilterReport:
    """Runs the curation pipeline and waits for it; the report it wrote.

    `clock`, when given, gets the per-step seconds and images from the job's metrics."""
    done = output.prepare(out_dir, plan(config, described), overwrite)
    provenance = {**(provenance or {}), **plan(config, described)}
    pipeline = beam.Pipeline(options=pipeline_options(list(beam_args)))
    build(pipeline, units, models, config, out_dir, done, provenance)
    result = pipeline.run()
    result.wait_until_finish()
    if clock is not None:
        _read_clock(result, clock)
    return FilterReport.from_dict(json.loads(paths.read_text(paths.join(out_dir, output.REPORT))))


def _read_clock(result, clock: StageClock) -> None:
    metrics = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    for dist in metrics["distributions"]:
        step = dist.key.metric.name.removesuffix(".us")
        if step in clock.seconds:
            clock.seconds[step] += dist.result.sum / 1e6
    for counter in metrics["counters"]:
        step = counter.key.metric.name.removesuffix(".images")
        if counter.key.metric.name.endswith(".images") and step in clock.images:
            clock.images[step] += counter.result
