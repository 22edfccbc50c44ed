"""The curation pipeline (SPEC 5): image -> caption -> nouns -> boxes -> masks -> records.

Stages are small protocols so any model can stand in: `curation_models.py` adapts
transformers' BLIP-2, Grounding DINO and SAM; tests use fakes. Per image, in the authors'
order: the original short side test, a caption (batched), its nouns (3 to 8), the
detector's boxes for them (2 to 8, thresholds applied by the detector), NMS, one mask per
box from the segmenter, the instance map they paint (a later box's mask wins, as in the
authors' PNGs), each subject's mask = the dominant instance in its box with holes filled,
then the record-time filters of `filters.filter_subjects` (unless disabled).

Images are stored as given, or shrunk to a short side of `store_short_side` (the authors
store 800) and re-encoded as JPEG; the models see the stored image, so boxes and masks are
in its pixels.

Resuming: the input is cut into chunks of `chunk_size` images; chunk k becomes its own
record folder `OUT/.chunks/chunk-0000k/` (written by `ShardWriter`, whose manifest comes
last, with the chunk's `report.json` written before it: its source ids and report). A
restart with the same input and chunk size skips complete chunks and redoes the one that
was cut off, so a crash loses at most one chunk. When every chunk is done, their records
are copied into OUT's shards, OUT's manifest is written and `.chunks` is removed.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import pathlib
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from sdjax.convert.files import read_json, write_json
from sdjax.data.filters import (
    AUTHORS_FILTERS,
    MIN_SHORT_SIDE,
    NMS_IOU,
    FilterConfig,
    FilterReport,
    detection_count_ok,
    dominant_instance_mask,
    filter_subjects,
    nms,
    noun_count_ok,
    short_side_ok,
)
from sdjax.data.nouns import caption_nouns
from sdjax.data.records import Record, Subject, encode_image, encode_mask
from sdjax.data.shards import MANIFEST, RecordSource, ShardWriter, read_manifest
from sdjax.errors import UserError

STORE_SHORT_SIDE = 800
_CHUNKS = ".chunks"
_PLAN = "plan.json"
_REPORT = "report.json"


@dataclass(frozen=True)
class Detections:
    """A detector's answer for one image: boxes float [N, 4] in pixels, scores [N], labels."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]


class Captioner(Protocol):
    def __call__(self, images: list[Image.Image]) -> list[str]: ...


class NounExtractor(Protocol):
    def __call__(self, caption: str) -> list[str]: ...


class Detector(Protocol):
    def __call__(self, image: Image.Image, nouns: list[str]) -> Detections: ...


class Segmenter(Protocol):
    """bool [N, H, W] masks of an RGB image for its boxes float [N, 4] (pixels)."""

    def __call__(self, image: Image.Image, boxes: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Stages:
    captioner: Captioner
    detector: Detector
    segmenter: Segmenter
    nouns: NounExtractor = caption_nouns


@dataclass(frozen=True)
class CurationConfig:
    chunk_size: int = 256  # images per chunk: the unit of work lost to a crash
    batch_size: int = 16  # images per captioner call
    min_short_side: int = MIN_SHORT_SIDE
    store_short_side: int = STORE_SHORT_SIDE
    filters: FilterConfig | None = AUTHORS_FILTERS  # None stores every detection
    records_per_shard: int = 1000

    def __post_init__(self):
        for name in ("chunk_size", "batch_size", "store_short_side", "records_per_shard"):
            if getattr(self, name) < 1:
                raise UserError(f"curation {name} must be at least 1, got {getattr(self, name)}")


def check_model_folder(path: str, role: str) -> None:
    """A one-line `UserError` unless `path` is a `save_pretrained` folder."""
    if not os.path.isdir(path):
        raise UserError(f"{role} model folder {path} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{role} model folder {path} has no config.json (save_pretrained layout)")


def folder_images(root: str) -> list[tuple[str, str]]:
    """(path relative to root, path) of every image file under root, in sorted order."""
    if not os.path.isdir(root):
        raise UserError(f"image folder {root} does not exist")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.lower().endswith((".jpg", ".jpeg", ".png", ".webp", ".bmp")):
                path = os.path.join(folder, name)
                found.append((os.path.relpath(path, root), path))
    if not found:
        raise UserError(f"no images (.jpg, .jpeg, .png, .webp, .bmp) under {root}")
    return found


def stored_image(data: bytes, short_side: int | None = None) -> tuple[Image.Image, bytes]:
    """The RGB image to store and its bytes: as given when JPEG or PNG no larger than
    `short_side` (None: any size), else shrunk to it and re-encoded as JPEG."""
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
        keep_bytes = opened.format in ("JPEG", "PNG")
    scale = 1.0 if short_side is None else short_side / min(image.size)
    if scale < 1:
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS)
    elif keep_bytes:
        return image, data
    return image, encode_image(np.asarray(image), "JPEG")


def _subjects(image: Image.Image, detections: Detections, segmenter: Segmenter) -> list[Subject]:
    masks = np.asarray(segmenter(image, detections.boxes), bool)
    instances = np.zeros(masks.shape[1:], np.int32)
    for value, mask in enumerate(masks, start=1):
        instances[mask] = value
    return [
        Subject(
            label=label,
            box=tuple(box),
            mask=encode_mask(dominant_instance_mask(instances, box)),
            score=score,
            attributes={"instance": str(value)},
        )
        for value, (label, box, score) in enumerate(
            zip(detections.labels, detections.boxes, detections.scores), start=1
        )
    ]


def curate_image(
    source_id: str,
    image: Image.Image,
    data: bytes,
    caption: str,
    stages: Stages,
    config: CurationConfig,
) -> tuple[Record | None, list[str]]:
    """One captioned image through nouns, detector, NMS and segmenter, then the filters."""
    nouns = stages.nouns(caption)
    if not noun_count_ok(len(nouns)):
        return None, ["noun_count"]
    found = stages.detector(image, nouns)
    named = [i for i, label in enumerate(found.labels) if label.strip()]
    reasons = ["label"] * (len(found.labels) - len(named))
    if not detection_count_ok(len(named)):
        return None, [*reasons, "detection_count"]
    boxes, scores = np.asarray(found.boxes)[named], np.asarray(found.scores)[named]
    kept = nms(boxes, scores, NMS_IOU)
    reasons += ["nms"] * (len(named) - len(kept))
    detections = Detections(boxes[kept], scores[kept], [found.labels[named[i]] for i in kept])
    record = Record(
        image=data,
        caption=caption,
        source_id=source_id,
        width=image.width,
        height=image.height,
        subjects=tuple(_subjects(image, detections, stages.segmenter)),
        attributes={"nouns": ",".join(nouns)},
    )
    if config.filters is None:
        return record, reasons
    record, dropped = filter_subjects(record, config.filters)
    return record, reasons + dropped


def _curate_chunk(items, stages: Stages, config: CurationConfig, writer, report, bar) -> None:
    loaded = []  # (source_id, stored image, its bytes)
    for source_id, source in items:
        try:
            data = source if isinstance(source, bytes) else pathlib.Path(source).read_bytes()
            with Image.open(io.BytesIO(data)) as probe:
                size = probe.size
            if not short_side_ok(*size, config.min_short_side):
                report.add(None, ["short_side"])
                continue
            loaded.append((source_id, *stored_image(data, config.store_short_side)))
        except (OSError, ValueError, Image.DecompressionBombError):
            report.add(None, ["unreadable"])
    bar.update(len(items) - len(loaded))
    for start in range(0, len(loaded), config.batch_size):
        batch = loaded[start : start + config.batch_size]
        captions = stages.captioner([image for _, image, _ in batch])
        for (source_id, image, data), caption in zip(batch, captions, strict=True):
            record, reasons = curate_image(source_id, image, data, caption, stages, config)
            report.add(record, reasons)
            if record is not None:
                writer.write(record)
        bar.update(len(batch))


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _prepare(out_dir: str, config: CurationConfig, overwrite: bool) -> str:
    """The chunk folder: made afresh, or kept from an unfinished run with the same plan."""
    work = os.path.join(out_dir, _CHUNKS)
    plan = {"chunk_size": config.chunk_size}
    if os.path.isdir(work) and not overwrite:
        previous = read_json(os.path.join(work, _PLAN))
        if previous != plan:
            raise UserError(
                f"{out_dir} holds an unfinished curation with plan {previous}, not {plan}"
            )
        return work
    if os.path.isfile(out_dir):
        raise UserError(f"output {out_dir} is a file, not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise UserError(f"output folder {out_dir} is not empty (pass --overwrite)")
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    write_json(os.path.join(work, _PLAN), plan)
    return work


def curate(
    items: Iterable[tuple[str, bytes | str]],
    stages: Stages,
    out_dir: str,
    config: CurationConfig = CurationConfig(),
    provenance: dict | None = None,
    overwrite: bool = False,
    total: int | None = None,
) -> FilterReport:
    """Curates (source id, image bytes or path) items into the record folder `out_dir`.

    Resumes an unfinished run in `out_dir` (see the module docstring); returns the report
    of every image, skipped chunks included.
    """
    from tqdm import tqdm

    work = _prepare(out_dir, config, overwrite)
    report = FilterReport()
    chunk_dirs = []
    with tqdm(total=total, unit="image", desc="curate", disable=None) as bar:
        for k, chunk in enumerate(_chunks(items, config.chunk_size)):
            chunk_dirs.append(os.path.join(work, f"chunk-{k:05d}"))
            report.merge(_run_chunk(chunk, chunk_dirs[-1], stages, config, bar))
    provenance = {
        **(provenance or {}),
        "generator": "curate",
        "config": dataclasses.asdict(config),
        "report": report.as_dict(),
    }
    _assemble(chunk_dirs, out_dir, config.records_per_shard, provenance)
    shutil.rmtree(work)
    return report


def _run_chunk(
    chunk: list, chunk_dir: str, stages: Stages, config: CurationConfig, bar
) -> FilterReport:
    """Curates one chunk into its folder, or reads the report of a complete one."""
    source_ids = [source_id for source_id, _ in chunk]
    if os.path.isfile(os.path.join(chunk_dir, MANIFEST)):
        done = read_json(os.path.join(chunk_dir, _REPORT))
        if done["source_ids"] != source_ids:
            raise UserError(f"{chunk_dir} was curated from other images: the input has changed")
        bar.update(len(chunk))
        return FilterReport.from_dict(done["report"])
    report = FilterReport()
    with ShardWriter(chunk_dir, config.records_per_shard, overwrite=True) as writer:
        _curate_chunk(chunk, stages, config, writer, report, bar)
        # Written before the manifest: a chunk with a manifest always has its report.
        write_json(
            os.path.join(chunk_dir, _REPORT), {"source_ids": source_ids, "report": report.as_dict()}
        )
    return report


def _assemble(chunk_dirs: list[str], out_dir: str, records_per_shard: int, provenance) -> None:
    with ShardWriter(out_dir, records_per_shard, provenance, overwrite=True) as writer:
        for chunk_dir in chunk_dirs:
            if read_manifest(chunk_dir)["count"] == 0:
                continue
            source = RecordSource(chunk_dir)
            for i in range(len(source)):
                record = source[i]
                if record is None:
                    raise UserError(
                        f"{chunk_dir}: record {i} is damaged; delete the folder to redo it"
                    )
                writer.write(record)
