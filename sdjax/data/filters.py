"""The authors' data filters (docs/method.md §5) as pure functions, and `filter_subjects`.

Two groups. Curation-time filters decide what the curation pipeline keeps of an image's
caption and detections (noun count, detector thresholds, detection count, NMS, short side).
Record-time filters decide which subjects of a stored record are usable for training (box
area and aspect, detector score, label in caption, mask fill, overlap, near-white images,
top-k, box size after the training crop). `filter_subjects` applies the record-time ones in
the authors' order and says what it dropped.

Conventions: boxes are float [N, 4] or [4] `(x1, y1, x2, y2)` in pixels (pixel edges, as
in `records.py`); images uint8 [H, W, 3]; masks bool [H, W]; instance maps integer [H, W]
(0 = background). Whether a threshold is strict follows the authors' code (and
transformers' Grounding DINO post-processing), which each docstring states.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sdjax.data.records import Record, image_array, mask_array

# Curation time.
MIN_NOUNS, MAX_NOUNS = 3, 8
BOX_THRESHOLD = 0.25
TEXT_THRESHOLD = 0.2
MIN_DETECTIONS, MAX_DETECTIONS = 2, 8
NMS_IOU = 0.5
MIN_SHORT_SIDE = 600
# Record (training) time.
MIN_AREA_RATIO, MAX_AREA_RATIO = 0.08, 0.7
MIN_ASPECT, MAX_ASPECT = 0.3, 3.0
MIN_LOGIT = 0.3
MIN_MASK_FILL = 0.6
MAX_OVERLAP = 0.8
# The authors count a pixel near-white when every channel is > 0.9 on a 0..1 scale, that
# is > 229.5 on 0..255: every channel >= 230.
NEAR_WHITE_LEVEL = 230
MAX_WHITE_FRACTION = 0.1
MAX_SUBJECTS = 2
MIN_CROP_BOX_AREA = 200.0  # square pixels of the 512 px training crop


def noun_count_ok(count: int, low: int = MIN_NOUNS, high: int = MAX_NOUNS) -> bool:
    """A caption is used when it has 3 to 8 nouns (both ends included)."""
    return low <= count <= high


def confident_boxes(box_scores, threshold: float = BOX_THRESHOLD) -> np.ndarray:
    """Grounding DINO queries kept: best token probability > 0.25 (strict). [N] bool."""
    return np.asarray(box_scores, np.float64) > threshold


def label_tokens(token_scores, threshold: float = TEXT_THRESHOLD) -> np.ndarray:
    """Prompt tokens that make a query's label: probability > 0.2 (strict)."""
    return np.asarray(token_scores, np.float64) > threshold


def detection_count_ok(count: int, low: int = MIN_DETECTIONS, high: int = MAX_DETECTIONS) -> bool:
    """An image is used when the detector finds 2 to 8 boxes (both ends included)."""
    return low <= count <= high


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(
        boxes[..., 3] - boxes[..., 1], 0, None
    )


def _intersections(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] intersection areas of boxes a [N, 4] and b [M, 4]."""
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    return np.prod(np.clip(high - low, 0, None), axis=-1)


def box_iou(a, b) -> np.ndarray:
    """[N, M] intersection over union of boxes a [N, 4] and b [M, 4] (0 where both are empty)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    inter = _intersections(a, b)
    union = _areas(a)[:, None] + _areas(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes, scores, iou_threshold: float = NMS_IOU) -> np.ndarray:
    """Greedy non-maximum suppression at IoU 0.5; int [K] kept indices, best first.

    As torchvision's `nms` (the authors'): a box is dropped when its IoU with a kept,
    higher-scoring box is > the threshold; ties in score keep the earlier box.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    iou = box_iou(boxes, boxes)
    kept: list[int] = []
    for i in order:
        if all(iou[i, j] <= iou_threshold for j in kept):
            kept.append(int(i))
    return np.asarray(kept, np.int64)


def short_side_ok(width: int, height: int, min_side: int = MIN_SHORT_SIDE) -> bool:
    """The original image's short side is >= 600 px.

    (The authors' script tests `width >= 600 or height >= 600`; the paper's short side is used.)
    """
    return min(width, height) >= min_side


def area_ratio_ok(
    boxes, width: int, height: int, low: float = MIN_AREA_RATIO, high: float = MAX_AREA_RATIO
) -> np.ndarray:
    """Box area / image area strictly inside (0.08, 0.7). [N] bool."""
    ratio = _areas(np.asarray(boxes, np.float64).reshape(-1, 4)) / (width * height)
    return (ratio > low) & (ratio < high)


def aspect_ok(boxes, low: float = MIN_ASPECT, high: float = MAX_ASPECT) -> np.ndarray:
    """Box width / height strictly inside (0.3, 3); a flat box fails. [N] bool."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    aspect = np.divide(w, h, out=np.full_like(w, np.inf), where=h > 0)
    return (aspect > low) & (aspect < high)


def logit_ok(scores, min_logit: float = MIN_LOGIT) -> np.ndarray:
    """The detector's score for the box is > 0.3 (strict). [N] bool."""
    return np.asarray(scores, np.float64) > min_logit


def label_in_caption(label: str, caption: str) -> bool:
    """The label is one word and the caption holds it as a word (case-insensitive).

    The authors test `caption.find(label) != -1`, which also accepts 'cat' in 'category';
    a whole-word match keeps the label a token of the caption.
    """
    if not label or any(c.isspace() for c in label):
        return False
    return re.search(rf"(?<!\w){re.escape(label)}(?!\w)", caption, re.IGNORECASE) is not None


def box_window(box, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """The pixels a box covers (edges rounded outwards), clipped to an [H, W] array."""
    x1, y1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x2, y2 = min(shape[1], math.ceil(box[2])), min(shape[0], math.ceil(box[3]))
    return slice(y1, max(y1, y2)), slice(x1, max(x1, x2))


def mask_fill(mask: np.ndarray, box) -> float:
    """The share of the box's pixels that the mask covers (0 for an empty box)."""
    inside = mask[box_window(box, mask.shape)]
    return float(inside.mean()) if inside.size else 0.0


def mask_fills_box(mask: np.ndarray, box, min_fill: float = MIN_MASK_FILL) -> bool:
    """The subject's mask covers >= 0.6 of its box."""
    return mask_fill(mask, box) >= min_fill


def dominant_instance_mask(instance_map: np.ndarray, box) -> np.ndarray:
    """The subject mask: the most frequent non-background id inside the box, holes
    filled (bool [H, W]; all False when the box holds only background)."""
    ids, counts = np.unique(instance_map[box_window(box, instance_map.shape)], return_counts=True)
    counts = counts[ids != 0]
    if not counts.size:
        return np.zeros(instance_map.shape, bool)
    return ndimage.binary_fill_holes(instance_map == ids[ids != 0][np.argmax(counts)])


def overlaps_kept(box, kept_boxes, max_overlap: float = MAX_OVERLAP) -> bool:
    """True when the box shares > 0.8 of the smaller box's area with a kept box."""
    box = np.asarray(box, np.float64).reshape(1, 4)
    kept = np.asarray(kept_boxes, np.float64).reshape(-1, 4)
    smaller = np.minimum(_areas(box)[:, None], _areas(kept)[None, :])
    inter = _intersections(box, kept)
    share = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
    return bool((share > max_overlap).any())


def near_white_fraction(image: np.ndarray, level: int = NEAR_WHITE_LEVEL) -> float:
    """The share of pixels whose every channel is >= `level` (230: the authors' > 0.9)."""
    return float(np.all(np.asarray(image) >= level, axis=-1).mean())


def mostly_white(
    image: np.ndarray, max_fraction: float = MAX_WHITE_FRACTION, level: int = NEAR_WHITE_LEVEL
) -> bool:
    """An image is dropped when more than 10% of its pixels are near-white."""
    return near_white_fraction(image, level) > max_fraction


def top_by_score(scores, k: int = MAX_SUBJECTS) -> np.ndarray:
    """Indices of the k highest scores (the authors keep 2), best first, ties by order."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k]


def crop_box_ok(box, min_area: float = MIN_CROP_BOX_AREA) -> bool:
    """A box in the 512 px training crop is kept when its area is > 200 square pixels
    (the authors' `post_bbox_filter` measures area, not side)."""
    return float(_areas(np.asarray(box, np.float64))) > min_area


@dataclass(frozen=True)
class FilterConfig:
    """The record-time thresholds `filter_subjects` applies (defaults: the authors')."""

    min_area_ratio: float = MIN_AREA_RATIO
    max_area_ratio: float = MAX_AREA_RATIO
    min_aspect: float = MIN_ASPECT
    max_aspect: float = MAX_ASPECT
    min_logit: float = MIN_LOGIT
    check_label: bool = True  # single-word label in the caption (the authors skip it for COCO)
    min_mask_fill: float = MIN_MASK_FILL
    max_overlap: float = MAX_OVERLAP
    near_white_level: int = NEAR_WHITE_LEVEL
    max_white_fraction: float = MAX_WHITE_FRACTION
    # The authors keep the top 2 only after the random training crop; None keeps every
    # subject that passes, best first, so the loader can still choose after its crop.
    max_subjects: int | None = None


AUTHORS_FILTERS = FilterConfig()


def _costly_failure(record: Record, subject, kept: list, config: FilterConfig) -> str | None:
    """The first of the label, mask-fill and overlap tests the subject fails, or None."""
    if config.check_label and not label_in_caption(subject.label, record.caption):
        return "label"
    if not mask_fills_box(mask_array(subject), subject.box, config.min_mask_fill):
        return "mask_fill"
    if overlaps_kept(subject.box, [s.box for s in kept], config.max_overlap):
        return "overlap"
    return None


def filter_subjects(
    record: Record, config: FilterConfig = AUTHORS_FILTERS
) -> tuple[Record | None, list[str]]:
    """The record with only its usable subjects, best score first, and why others went.

    In the authors' order: the near-white image test, then subject by subject in
    descending score: area ratio, aspect, score, label, mask fill, overlap with a subject
    already kept; then `max_subjects`. Returns (record or None, reasons): one reason per
    dropped subject ('area_ratio', 'aspect', 'logit', 'label', 'mask_fill', 'overlap',
    'top_k'), and when the record itself is dropped, its reason last ('near_white', or
    'no_subjects' when none is left).
    """
    if mostly_white(image_array(record), config.max_white_fraction, config.near_white_level):
        return None, ["near_white"]
    subjects = record.subjects
    boxes = np.asarray([s.box for s in subjects], np.float64).reshape(-1, 4)
    scores = np.asarray([s.score for s in subjects], np.float64)
    cheap = {  # vectorised over subjects, tested in this order
        "area_ratio": area_ratio_ok(
            boxes, record.width, record.height, config.min_area_ratio, config.max_area_ratio
        ),
        "aspect": aspect_ok(boxes, config.min_aspect, config.max_aspect),
        "logit": logit_ok(scores, config.min_logit),
    }
    kept, reasons = [], []
    for i in np.argsort(-scores, kind="stable"):
        failed = next((name for name, ok in cheap.items() if not ok[i]), None)
        failed = failed or _costly_failure(record, subjects[i], kept, config)
        if failed is None:
            kept.append(subjects[i])
        else:
            reasons.append(failed)
    if config.max_subjects is not None:
        reasons += ["top_k"] * len(kept[config.max_subjects :])
        kept = kept[: config.max_subjects]
    if not kept:
        return None, [*reasons, "no_subjects"]
    return dataclasses.replace(record, subjects=tuple(kept)), reasons


@dataclass
class FilterReport:
    """Counts of what an import or a curation kept and dropped, by reason."""

    images_seen: int = 0
    images_kept: int = 0
    subjects_kept: int = 0
    dropped_images: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dropped_subjects: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, record: Record | None, reasons: list[str]) -> None:
        """One image's outcome, as `filter_subjects` returns it (a dropped image's reason last)."""
        self.images_seen += 1
        if record is None:
            self.dropped_images[reasons[-1]] += 1
            self.dropped_subjects.update(reasons[:-1])
        else:
            self.images_kept += 1
            self.subjects_kept += len(record.subjects)
            self.dropped_subjects.update(reasons)

    def merge(self, other: FilterReport) -> None:
        self.images_seen += other.images_seen
        self.images_kept += other.images_kept
        self.subjects_kept += other.subjects_kept
        self.dropped_images.update(other.dropped_images)
        self.dropped_subjects.update(other.dropped_subjects)

    def as_dict(self) -> dict:
        return {
            "images_seen": self.images_seen,
            "images_kept": self.images_kept,
            "subjects_kept": self.subjects_kept,
            "dropped_images": dict(sorted(self.dropped_images.items())),
            "dropped_subjects": dict(sorted(self.dropped_subjects.items())),
        }

    @classmethod
    def from_dict(cls, data: dict) -> FilterReport:
        counters = {k: collections.Counter(data[k]) for k in ("dropped_images", "dropped_subjects")}
        return cls(data["images_seen"], data["images_kept"], data["subjects_kept"], **counters)

    def summary(self) -> str:
        """Three lines: kept, dropped images by reason, dropped subjects by reason."""

        def listed(counter: collections.Counter) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"

        return (
            f"kept {self.images_kept} of {self.images_seen} images, "
            f"{self.subjects_kept} subjects\n"
            f"dropped images: {listed(self.dropped_images)}\n"
            f"dropped subjects: {listed(self.dropped_subjects)}"
        )
