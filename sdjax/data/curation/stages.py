"""The curation stages (docs/method.md §5), one function per step, shared by both runners.

Per image, in the authors' order: load (the original short side test; the image to store),
caption (batched), nouns (3 to 8), detect (the nouns' boxes, thresholds applied by the
detector), select (labelled boxes, 2 to 8 of them, NMS), segment (one mask per box), record
(the instance map the masks paint, a later box's mask winning as in the authors' PNGs; each
subject's mask = the dominant instance in its box with holes filled; then the record-time
filters of `filters.filter_subjects`, unless disabled).

The unit the model steps see is a batch: up to `batch_size` consecutive loaded images of one
block (`sources.py`). Both runners cut batches the same way, so each model sees the same
inputs in the same batches and the Beam output equals the single-process output bit for bit
(a batched forward pass differs from single-image passes in float rounding, so batch
composition has to be fixed, not left to the runner). An `Item` flows through the steps;
each step returns it advanced (a new object: Beam's inputs are never mutated) or an
`Outcome` when the image is dropped. `curate_batch` chains the steps for one batch.

Images are stored as given, or shrunk to a short side of `store_short_side` (the authors
store 800) and re-encoded as JPEG; the models see the stored image, so boxes and masks are
in its pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image

from sdjax import paths
from sdjax.data.filters import (
    AUTHORS_FILTERS,
    MIN_SHORT_SIDE,
    NMS_IOU,
    FilterConfig,
    detection_count_ok,
    dominant_instance_mask,
    filter_subjects,
    nms,
    noun_count_ok,
    short_side_ok,
)
from sdjax.data.nouns import caption_nouns
from sdjax.data.records import Record, Subject, encode_image, encode_mask
from sdjax.errors import UserError

STORE_SHORT_SIDE = 800
STEPS = ("read", "load", "caption", "nouns", "detect", "select", "segment", "record", "write")


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
    """Per image of a batch, the detections of its nouns."""

    def __call__(self, images: list[Image.Image], nouns: list[list[str]]) -> list[Detections]: ...


class Segmenter(Protocol):
    """Per image of a batch, bool [N, H, W] masks for its boxes float [N, 4] (pixels)."""

    def __call__(self, images: list[Image.Image], boxes: list[np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class Stages:
    captioner: Captioner
    detector: Detector
    segmenter: Segmenter
    nouns: NounExtractor = caption_nouns


def check_model_folder(path: str, role: str) -> None:
    """A one-line `UserError` unless `path` (local or gs://) is a `save_pretrained` folder."""
    if not paths.isdir(path):
        raise UserError(f"{role} model folder {path} does not exist")
    if not paths.exists(paths.join(path, "config.json")):
        raise UserError(f"{role} model folder {path} has no config.json (save_pretrained layout)")


@dataclass(frozen=True)
class CurationConfig:
    chunk_size: int = 256  # input images per block: one shard, the unit of work and restart
    batch_size: int = 16  # images per model call
    min_short_side: int = MIN_SHORT_SIDE
    store_short_side: int = STORE_SHORT_SIDE
    filters: FilterConfig | None = AUTHORS_FILTERS  # None stores every detection

    def __post_init__(self):
        for name in ("chunk_size", "batch_size", "store_short_side"):
            if getattr(self, name) < 1:
                raise UserError(f"curation {name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Outcome:
    """What became of one input image: its encoded record, or None and why it was dropped.

    `reasons`: one per subject not kept, then, for a dropped image, the image's reason last
    (the shape `FilterReport.add` takes)."""

    block: tuple[int, int]
    position: int
    record: bytes | None
    subjects: int
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Raw:
    """An input image as read: bytes (None when unreadable) and attributes to keep."""

    block: tuple[int, int]
    position: int
    source_id: str
    data: bytes | None
    attributes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Item:
    """A loaded image on its way through the steps (the stored bytes and what is known)."""

    block: tuple[int, int]
    position: int
    source_id: str
    data: bytes
    attributes: dict = field(default_factory=dict)
    caption: str = ""
    nouns: tuple[str, ...] = ()
    detections: Detections | None = None
    masks: np.ndarray | None = None
    reasons: tuple[str, ...] = ()

    @property
    def image(self) -> Image.Image:
        """The stored image, decoded once per process (not pickled with the item)."""
        cached = self.__dict__.get("_image")
        if cached is None:
            with Image.open(io.BytesIO(self.data)) as opened:
                cached = opened.convert("RGB")
            object.__setattr__(self, "_image", cached)
        return cached

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_image"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def dropped(self, reason: str) -> Outcome:
        return Outcome(self.block, self.position, None, 0, (*self.reasons, reason))


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


def load(raw: Raw, config: CurationConfig) -> Item | Outcome:
    """The original short side test, then the image to store."""
    dropped = Outcome(raw.block, raw.position, None, 0, ("unreadable",))
    if raw.data is None:
        return dropped
    try:
        with Image.open(io.BytesIO(raw.data)) as probe:
            size = probe.size
        if not short_side_ok(*size, config.min_short_side):
            return dataclasses.replace(dropped, reasons=("short_side",))
        image, data = stored_image(raw.data, config.store_short_side)
    except (OSError, ValueError, Image.DecompressionBombError):
        return dropped
    item = Item(raw.block, raw.position, raw.source_id, data, dict(raw.attributes))
    object.__setattr__(item, "_image", image)
    return item


def batches(items: Sequence[Item], size: int) -> Iterator[tuple[Item, ...]]:
    """Consecutive batches of `size` (the last one shorter) of one block's loaded items."""
    for start in range(0, len(items), size):
        yield tuple(items[start : start + size])


def caption(items: Sequence[Item], captioner: Captioner) -> list[Item]:
    captions = captioner([item.image for item in items])
    return [_advance(item, caption=text) for item, text in zip(items, captions, strict=True)]


def find_nouns(item: Item, extractor: NounExtractor = caption_nouns) -> Item | Outcome:
    nouns = tuple(extractor(item.caption))
    if not noun_count_ok(len(nouns)):
        return item.dropped("noun_count")
    return _advance(item, nouns=nouns)


def detect(items: Sequence[Item], detector: Detector) -> list[Item]:
    found = detector([item.image for item in items], [list(item.nouns) for item in items])
    return [_advance(item, detections=d) for item, d in zip(items, found, strict=True)]


def select(item: Item) -> Item | Outcome:
    """Labelled detections, 2 to 8 of them, then NMS."""
    found = item.detections
    named = [i for i, label in enumerate(found.labels) if label.strip()]
    reasons = (*item.reasons, *["label"] * (len(found.labels) - len(named)))
    if not detection_count_ok(len(named)):
        return Outcome(item.block, item.position, None, 0, (*reasons, "detection_count"))
    boxes, scores = np.asarray(found.boxes)[named], np.asarray(found.scores)[named]
    kept = nms(boxes, scores, NMS_IOU)
    reasons += ("nms",) * (len(named) - len(kept))
    chosen = Detections(boxes[kept], scores[kept], [found.labels[named[i]] for i in kept])
    return _advance(item, detections=chosen, reasons=reasons)


def segment(items: Sequence[Item], segmenter: Segmenter) -> list[Item]:
    boxes = [item.detections.boxes for item in items]
    masks = segmenter([item.image for item in items], boxes)
    return [_advance(item, masks=np.asarray(m, bool)) for item, m in zip(items, masks, strict=True)]


def to_record(item: Item, config: CurationConfig) -> Outcome:
    """The record the masks and detections make, through the record-time filters."""
    found, image = item.detections, item.image
    instances = np.zeros(item.masks.shape[1:], np.int32)
    for value, mask in enumerate(item.masks, start=1):
        instances[mask] = value
    subjects = tuple(
        Subject(
            label=label,
            box=tuple(box),
            mask=encode_mask(dominant_instance_mask(instances, box)),
            score=score,
            attributes={"instance": str(value)},
        )
        for value, (label, box, score) in enumerate(
            zip(found.labels, found.boxes, found.scores), start=1
        )
    )
    record = Record(
        image=item.data,
        caption=item.caption,
        source_id=item.source_id,
        width=image.width,
        height=image.height,
        subjects=subjects,
        attributes={**item.attributes, "nouns": ",".join(item.nouns)},
    )
    reasons = item.reasons
    if config.filters is not None:
        record, dropped = filter_subjects(record, config.filters)
        reasons += tuple(dropped)
    if record is None:
        return Outcome(item.block, item.position, None, 0, reasons)
    return Outcome(item.block, item.position, record.encode(), len(record.subjects), reasons)


def _advance(item: Item, **changes) -> Item:
    """A copy of the item with `changes`, keeping its decoded image."""
    new = dataclasses.replace(item, **changes)
    if "_image" in item.__dict__:
        object.__setattr__(new, "_image", item.__dict__["_image"])
    return new


def split(results: Sequence[Item | Outcome], outcomes: list[Outcome]) -> list[Item]:
    """The items that go on; the outcomes (dropped images) are appended to `outcomes`."""
    outcomes += [r for r in results if isinstance(r, Outcome)]
    return [r for r in results if isinstance(r, Item)]


class StageClock:
    """Seconds and images per step, summed (the single-process runner's breakdown)."""

    def __init__(self):
        self.seconds = dict.fromkeys(STEPS, 0.0)
        self.images = dict.fromkeys(STEPS, 0)

    @contextlib.contextmanager
    def __call__(self, step: str, images: int = 1):
        start = time.perf_counter()
        yield
        self.seconds[step] += time.perf_counter() - start
        self.images[step] += images


def curate_batch(
    items: Sequence[Item],
    stages: Stages,
    config: CurationConfig,
    clock: Callable | None = None,
) -> list[Outcome]:
    """One batch through caption, nouns, detect, select, segment and record."""
    clock = clock or StageClock()
    outcomes: list[Outcome] = []
    with clock("caption", len(items)):
        items = caption(items, stages.captioner)
    with clock("nouns", len(items)):
        items = split([find_nouns(item, stages.nouns) for item in items], outcomes)
    if items:
        with clock("detect", len(items)):
            items = detect(items, stages.detector)
        with clock("select", len(items)):
            items = split([select(item) for item in items], outcomes)
    if items:
        with clock("segment", len(items)):
            items = segment(items, stages.segmenter)
        with clock("record", len(items)):
            outcomes += [to_record(item, config) for item in items]
    return sorted(outcomes, key=lambda o: o.position)


def curate_image(
    source_id: str, image: Image.Image, data: bytes, caption: str, stages, config
) -> tuple[Record | None, list[str]]:
    """One captioned image through nouns, detect, select, segment and record (a check)."""
    item = Item((0, 0), 0, source_id, data, caption=caption)
    object.__setattr__(item, "_image", image)
    result = find_nouns(item, stages.nouns)
    if isinstance(result, Item):
        result = select(detect([result], stages.detector)[0])
    if isinstance(result, Item):
        result = to_record(segment([result], stages.segmenter)[0], config)
    record = None if result.record is None else Record.decode(result.record)
    return record, list(result.reasons)
