"""Per-example training transforms: one `Record` -> one example of the loader's batch contract.

`ExampleTransform` is a grain `RandomMap`: given the record and a numpy Generator (grain
derives it from the loader seed and the example's index) it returns, with N subject
slots, R output size, M mask size, S image-encoder size, L tokens:

    image [R,R,3] f32 in [-1,1]     refs [N,S,S,3] f32        boxes [N,4] f32 xyxy in [0,1]
    valid, use_box [N] bool         ids [L] i32               placeholders, label_positions [N] i32
    masks [N,M,M] f32 in [0,1]      regions [N,M,M] f32 in [0,1]    (the masks, or the boxes)
    drop_text, drop_loc, drop_objs: bool scalars
    noise_seed: int32 scalar (the train step's per-example noise and timestep)

Empty slots are zeros. The steps (docs/method.md §5, "Preprocessing"): keep the best-scoring
subjects; a random square crop holding all their boxes, resized to R; references cut from
the uncropped image and mask, augmented (flip, rotation, torchvision-style perspective,
white fill), resized to S and normalised; the caption (toy records: usually without the
colours and patterns, so appearance must come from the reference); the placeholder prompt;
classifier-free-guidance drops; the regions for region-bound attention: the subjects'
masks, or with probability `region_box_prob` their boxes (what the sampler binds a subject
given without a mask to).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grain
import numpy as np
from PIL import Image

from sdjax.conditioning import WHITE, normalise, segment_square, subject_region
from sdjax.data import toy
from sdjax.data.records import Record, Subject, image_array, mask_array
from sdjax.errors import UserError
from sdjax.tokenizer import Tokenizer

if TYPE_CHECKING:
    from sdjax.subject_diffusion import ModelConfig

_FILL = (WHITE, WHITE, WHITE)
_TOY_ATTRIBUTES = frozenset({"colour", "pattern", "shape"})
_PROBABILITIES = (
    "describe_prob",
    "p_text",
    "p_both",
    "p_mask",
    "hflip_prob",
    "perspective",
    "perspective_prob",
    "region_box_prob",
)


@dataclass(frozen=True)
class ExampleConfig:
    """The `data` config keys that shape each example (where and how records are read is
    the loader's part of the section).

    describe_prob: share of toy examples captioned with colours and patterns.
    p_text / p_both / p_mask: classifier-free-guidance drop rates (docs/method.md §4).
    hflip_prob, rotate_degrees, perspective (torchvision's distortion_scale),
    perspective_prob: reference augmentation. region_box_prob: share of examples whose
    attention regions are their boxes, not their masks.
    """

    describe_prob: float = 0.0
    p_text: float = 0.05
    p_both: float = 0.05
    p_mask: float = 0.05
    hflip_prob: float = 0.5
    rotate_degrees: float = 10.0
    perspective: float = 0.5
    perspective_prob: float = 0.5
    region_box_prob: float = 0.0

    def __post_init__(self):
        for name in _PROBABILITIES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.p_text + self.p_both + self.p_mask > 1.0:
            raise UserError("data.p_text + data.p_both + data.p_mask must not exceed 1")
        if self.rotate_degrees < 0:
            raise UserError(f"data.rotate_degrees must be >= 0, got {self.rotate_degrees}")


@dataclass(frozen=True)
class Geometry:
    """What the examples' shapes take from the model config (kept small: worker processes
    unpickle it without importing the model code)."""

    resolution: int  # R
    mask_size: int  # M, the latent size: where the attention maps live
    slots: int  # N
    ref_size: int  # S
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    single_subject_box: bool

    @classmethod
    def of(cls, config: ModelConfig) -> Geometry:
        return cls(
            resolution=config.resolution,
            mask_size=config.latent_size,
            slots=config.max_subjects,
            ref_size=config.image.image_size,
            mean=tuple(config.image.mean),
            std=tuple(config.image.std),
            single_subject_box=config.single_subject_box,
        )


def cfg_drops(r: float, p_text: float, p_both: float, p_mask: float) -> dict[str, bool]:
    """Classifier-free-guidance drops for one draw r ~ U(0, 1) (docs/method.md §4):
    [0, p_text) drops the text; the next p_both the text, the location mask and the
    grounding tokens (as the sampler's unconditional branch); the next p_mask the location
    mask alone."""
    text_only = r < p_text
    both = p_text <= r < p_text + p_both
    mask_only = p_text + p_both <= r < p_text + p_both + p_mask
    return {"drop_text": text_only or both, "drop_loc": both or mask_only, "drop_objs": both}


def training_caption(record: Record, rng: np.random.Generator, describe_prob: float) -> str:
    """The record's caption; for a toy record, with probability 1 - `describe_prob`, the
    caption without colours and patterns ('a star and a ring on a gray background')."""
    background = record.attributes.get("background")
    attributes = [dict(s.attributes) for s in record.subjects]
    is_toy = background is not None and all(a.keys() >= _TOY_ATTRIBUTES for a in attributes)
    if not (is_toy and attributes) or rng.random() < describe_prob:
        return record.caption
    return toy.caption(attributes, background, describe=False)


def _axis_offset(low: float, high: float, extent: int, side: int, rng) -> int:
    """Start of a `side`-long window in [0, extent) holding [low, high): uniform over the
    windows that do; centred on [low, high) (clipped to the image) when none does."""
    first, last = max(0, math.ceil(high) - side), min(extent - side, math.floor(low))
    if first <= last:
        return int(rng.integers(first, last + 1))
    return int(np.clip(round((low + high - side) / 2), 0, extent - side))


def crop_window(boxes: np.ndarray, width: int, height: int, rng) -> tuple[int, int, int]:
    """(x0, y0, side): the largest square the image holds, placed at random where it
    contains every box `[K, 4]` (pixel edges); an axis that cannot hold them all is centred."""
    side = min(width, height)
    if len(boxes) == 0:
        boxes = np.asarray([[0.0, 0.0, width, height]])
    x0 = _axis_offset(boxes[:, 0].min(), boxes[:, 2].max(), width, side, rng)
    y0 = _axis_offset(boxes[:, 1].min(), boxes[:, 3].max(), height, side, rng)
    return x0, y0, side


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """bool `[s, s]` -> float32 `[size, size]` in [0, 1], bilinear with antialiasing (PIL
    widens the filter when shrinking, like torch's `antialias=True`)."""
    resized = Image.fromarray(mask.astype(np.float32), "F").resize((size, size), Image.BILINEAR)
    return np.clip(np.asarray(resized, np.float32), 0.0, 1.0)


def perspective_coefficients(src: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
    """The 8 coefficients of the homography taking each `dst` point to its `src` point
    (`[4, 2]` each), in the order PIL's `Image.PERSPECTIVE` transform reads them; None when
    that form has no solution (whole-pixel corners can put the origin on the vanishing line,
    and a 1-pixel square has no distinct corners)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    try:
        return np.linalg.solve(np.asarray(rows, np.float64), np.asarray(rhs, np.float64))
    except np.linalg.LinAlgError:
        return None


def perspective_corners(width: int, height: int, distortion: float, rng) -> np.ndarray:
    """Where torchvision's `RandomPerspective(distortion)` sends the corners (TL, TR, BR,
    BL): each moves inwards by up to `distortion` of the half width/height, in whole pixels."""
    dx, dy = int(distortion * (width // 2)), int(distortion * (height // 2))

    def near(limit):  # a coordinate within the margin of the 0 edge
        return int(rng.integers(0, limit + 1))

    def far(extent, limit):  # ... of the far edge
        return int(rng.integers(extent - limit - 1, extent))

    return np.asarray(
        [
            [near(dx), near(dy)],
            [far(width, dx), near(dy)],
            [far(width, dx), far(height, dy)],
            [near(dx), far(height, dy)],
        ],
        np.float64,
    )


def augment_reference(square: np.ndarray, rng, config: ExampleConfig) -> np.ndarray:
    """uint8 `[s, s, 3]` -> the same size, flipped (p = `hflip_prob`), rotated uniformly
    within +-`rotate_degrees` and, with p = `perspective_prob`, perspective-warped by
    `perspective` (left unwarped when the corners drawn admit no PIL homography); uncovered
    corners are white, resampling bilinear."""
    image = Image.fromarray(square)
    if rng.random() < config.hflip_prob:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    angle = rng.uniform(-config.rotate_degrees, config.rotate_degrees)
    image = image.rotate(angle, resample=Image.BILINEAR, fillcolor=_FILL)
    if rng.random() < config.perspective_prob:
        w, h = image.size
        start = np.asarray([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float64)
        end = perspective_corners(w, h, config.perspective, rng)
        coefficients = perspective_coefficients(start, end)
        if coefficients is not None:
            image = image.transform(
                image.size, Image.PERSPECTIVE, tuple(coefficients), Image.BILINEAR, fillcolor=_FILL
            )
    return np.asarray(image)


def _ranked_subjects(record: Record, slots: int) -> list[tuple[Subject, np.ndarray]]:
    """Up to `slots` (subject, full-size mask) pairs, best score first (stable on ties);
    subjects with an empty mask are unusable and skipped."""
    ranked = sorted(record.subjects, key=lambda s: -s.score)
    kept = []
    for subject in ranked:
        mask = mask_array(subject)
        if mask.any():
            kept.append((subject, mask))
        if len(kept) == slots:
            break
    return kept


@dataclass(frozen=True)
class ExampleTransform(grain.transforms.RandomMap):
    """Record -> one example (module docstring); picklable for grain worker processes."""

    config: ExampleConfig
    geometry: Geometry
    tokenizer: Tokenizer

    def random_map(self, record: Record, rng: np.random.Generator) -> dict[str, np.ndarray]:
        cfg, geo = self.config, self.geometry
        drops = cfg_drops(rng.random(), cfg.p_text, cfg.p_both, cfg.p_mask)
        caption = training_caption(record, rng, cfg.describe_prob)
        image = image_array(record)
        subjects = _ranked_subjects(record, geo.slots)
        boxes = np.asarray([s.box for s, _ in subjects], np.float64).reshape(-1, 4)
        x0, y0, side = crop_window(boxes, record.width, record.height, rng)
        crop = Image.fromarray(image[y0 : y0 + side, x0 : x0 + side])
        crop = np.asarray(crop.resize((geo.resolution,) * 2, Image.BICUBIC), np.float32)

        example = self._empty_slots()
        labels = []
        for (subject, mask), box in zip(subjects, boxes):
            crop_box = np.clip((box - [x0, y0, x0, y0]) / side, 0.0, 1.0)
            crop_mask = mask[y0 : y0 + side, x0 : x0 + side]
            if crop_box[2] <= crop_box[0] or crop_box[3] <= crop_box[1] or not crop_mask.any():
                continue  # cropped away: only when the boxes could not all fit
            slot = len(labels)
            labels.append(subject.label)
            example["boxes"][slot] = crop_box
            example["masks"][slot] = resize_mask(crop_mask, geo.mask_size)
            square = augment_reference(segment_square(image, mask), rng, cfg)
            example["refs"][slot] = normalise(square, geo.ref_size, geo.mean, geo.std)

        tokens = self.tokenizer.prompt(caption, labels, geo.slots)
        example["image"] = crop / 127.5 - 1.0
        example["valid"] = tokens.valid
        example["use_box"] = tokens.valid & (len(labels) > 1 or geo.single_subject_box)
        example["ids"] = self.tokenizer.plain("") if drops["drop_text"] else tokens.ids
        example["placeholders"] = tokens.placeholder_positions
        example["label_positions"] = tokens.label_positions
        example.update({name: np.bool_(flag) for name, flag in drops.items()})
        # Seeds this example's diffusion noise and timestep in the train step, so they
        # follow the example, not its position in a (per-process) batch.
        example["noise_seed"] = np.int32(rng.integers(0, 2**31 - 1))
        example["regions"] = example["masks"]
        if rng.random() < cfg.region_box_prob:
            example["regions"] = np.zeros_like(example["masks"])
            for slot in range(len(labels)):
                example["regions"][slot] = subject_region(example["boxes"][slot], geo.mask_size)
        return example

    def _empty_slots(self) -> dict[str, np.ndarray]:
        n, geo = self.geometry.slots, self.geometry
        return {
            "refs": np.zeros((n, geo.ref_size, geo.ref_size, 3), np.float32),
            "boxes": np.zeros((n, 4), np.float32),
            "masks": np.zeros((n, geo.mask_size, geo.mask_size), np.float32),
        }


def describe_subject(subject: Subject) -> str:
    """A subject's appearance in words: 'a red striped star' for toy subjects (their
    attributes), else 'a {label}'."""
    a = subject.attributes
    if {"colour", "pattern", "shape"} <= set(a):
        return f"a {a['colour']} {a['pattern']} {a['shape']}"
    return f"a {subject.label}"


@dataclass(frozen=True)
class ContrastiveTransform(grain.transforms.RandomMap):
    """Record -> one random subject as an (image, text) pair for CLIP-style pre-training:
    {"image": float32 `[S, S, 3]` (its augmented reference view), "ids": int32 `[L]`}."""

    config: ExampleConfig
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tokenizer: Tokenizer

    def random_map(self, record: Record, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        subjects = _ranked_subjects(record, len(record.subjects))
        if not subjects:
            return None
        subject, mask = subjects[rng.integers(len(subjects))]
        square = augment_reference(segment_square(image_array(record), mask), rng, self.config)
        return {
            "image": normalise(square, self.size, self.mean, self.std),
            "ids": self.tokenizer.plain(describe_subject(subject)),
        }
