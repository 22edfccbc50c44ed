"""Subjects as people give them: `Subject`, its reference image, mask and box, and the
`--subjects` JSON file. Light to import (numpy and PIL only): the command line checks every
input here before it loads a model.

- Images and masks are paths, PIL images or arrays. A photo's EXIF orientation is applied
  (a phone's portrait JPEG is stored sideways), so a mask drawn on the photo as it is shown
  fits it. An image with transparency (an RGBA cut-out) brings its mask: alpha > 127 is the
  subject, unless a mask is given. Images over PIL's decompression-bomb limit are refused.
- A box is `[x1, y1, x2, y2]` in [0, 1] of the output image, x1 < x2, y1 < y2.
- The JSON file (`SPEC_FORMAT`) is checked field by field, each error naming its entry.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from sdjax.errors import UserError

SPEC_FORMAT = """\
SPEC.json is a list with one object per subject, for example
  [{"image": "star.png", "label": "star"},
   {"image": "ring.png", "label": "ring", "mask": "ring_mask.png", "box": [0.5, 0.2, 0.9, 0.6]}]
  image  (required) the reference photo; a relative path is relative to the JSON file
  label  (required) the subject's class word, e.g. "star"
  mask   (optional) white = subject, the image's size; default: the image's transparency,
         else the whole image
  box    (optional) [x1, y1, x2, y2] in [0, 1] of the output image; default: placed by
         the sampler
No other keys."""

_SPEC_KEYS = ("image", "label", "mask", "box")


@dataclass
class Subject:
    """One subject: a reference image (path, PIL image or uint8 array), its label
    ("dog"), an optional mask (same forms; white = subject) and an optional box
    (x1, y1, x2, y2) in [0, 1] of the output image. Without a mask, an image with
    transparency is cut out by its alpha, any other is used whole."""

    image: Any
    label: str
    mask: Any = None
    box: Sequence[float] | None = None


def _open(src, what: str) -> Image.Image:
    """A path or PIL image as a PIL image in its displayed orientation (EXIF applied)."""
    if isinstance(src, Image.Image):
        return ImageOps.exif_transpose(src)
    try:
        with warnings.catch_warnings():  # large photos (up to twice PIL's limit) are fine
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                im.load()
                return ImageOps.exif_transpose(im)
    except Image.DecompressionBombError as err:
        limit = 2 * Image.MAX_IMAGE_PIXELS / 1e6
        raise UserError(
            f"{what} {src} is too large to read safely ({_first_line(err)}); "
            f"downscale it below {limit:.0f} megapixels"
        ) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise UserError(f"cannot read {what} {src}: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_image(src, what: str = "image") -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 `[H, W, 3]`, its alpha as a bool mask `[H, W]` or None when it has none or
    is opaque) from a path, a PIL image or an array (`[H, W]`, `[H, W, 3]` or `[H, W, 4]`;
    uint8, bool, or floats in [0, 1])."""
    if isinstance(src, str | os.PathLike | Image.Image):
        im = _open(src, what)
        if im.has_transparency_data:
            rgba = np.asarray(im.convert("RGBA"))
            return _with_alpha(rgba[..., :3], rgba[..., 3], what, src)
        return np.asarray(im.convert("RGB")), None
    arr = np.asarray(src)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
            raise UserError(f"{what} array must hold finite numbers, got dtype {arr.dtype}")
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or 0 in arr.shape:
        raise UserError(f"{what} array has shape {arr.shape}; need [H, W, 3] or [H, W, 4]")
    if arr.shape[-1] == 4:
        return _with_alpha(arr[..., :3], arr[..., 3], what, "array")
    return arr, None


def _with_alpha(rgb: np.ndarray, alpha: np.ndarray, what: str, src) -> tuple:
    mask = alpha > 127
    if mask.all():
        return np.ascontiguousarray(rgb), None
    if not mask.any():
        raise UserError(f"{what} {src} is fully transparent")
    return np.ascontiguousarray(rgb), mask


def read_mask(src, shape: tuple[int, int], what: str = "mask") -> np.ndarray:
    """bool `[H, W]` (grey > 127), which must match its image's size `shape`."""
    image, alpha = read_image(src, what)
    mask = image.mean(axis=-1) > 127
    if alpha is not None:  # a transparent pixel of a mask is not the subject
        mask &= alpha
    if mask.shape != shape:
        raise UserError(
            f"{what} is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}"
        )
    if not mask.any():
        raise UserError(f"{what} is empty (no pixel above 127)")
    return mask


def load_subject(subject: Subject, index: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Subject `index` (0-based) -> (image uint8 `[H, W, 3]`, mask bool `[H, W]`, whether the
    mask is the subject's outline: given, or the image's alpha)."""
    name = f"subject {index + 1}"
    if not isinstance(subject.label, str) or not subject.label.strip():
        raise UserError(f"{name} has an empty label")
    image, alpha = read_image(subject.image, f"{name} image")
    if subject.mask is not None:
        return image, read_mask(subject.mask, image.shape[:2], f"{name} mask"), True
    if alpha is not None:
        return image, alpha, True
    return image, np.ones(image.shape[:2], bool), False


def check_box(box, what: str = "box") -> tuple[float, float, float, float]:
    """A validated (x1, y1, x2, y2) box in [0, 1] with x1 < x2 and y1 < y2."""
    if isinstance(box, str | bytes) or not isinstance(box, Sequence | np.ndarray):
        raise UserError(f"{what} must be a list of 4 numbers [x1, y1, x2, y2], got {box!r}")
    if len(box) != 4:
        raise UserError(f"{what} needs 4 numbers x1, y1, x2, y2, got {len(box)}: {list(box)}")
    values = []
    for v in box:
        if isinstance(v, bool) or not isinstance(v, int | float | np.number):
            raise UserError(f"{what} {list(box)}: {v!r} is not a number")
        values.append(float(v))
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        raise UserError(f"{what} {values} is outside [0, 1]")
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise UserError(f"{what} {values} needs x1 < x2 and y1 < y2")
    return x1, y1, x2, y2


def parse_box(text: str, what: str = "box") -> tuple[float, float, float, float]:
    """'0.1,0.2,0.5,0.6' (commas and/or spaces) -> a checked box."""
    parts = text.replace(",", " ").split()
    try:
        numbers = [float(v) for v in parts]
    except ValueError:
        raise UserError(f"{what} {text!r} is not four numbers x1,y1,x2,y2") from None
    return check_box(numbers, what)


def read_subject_spec(path: str) -> list[Subject]:
    """The subjects of a `--subjects` JSON file (`SPEC_FORMAT`), every field checked."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read subjects file {path}: {_first_line(err)}") from None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: expected a non-empty JSON list of subjects (see --help)")
    base = os.path.dirname(os.path.abspath(path))
    return [_spec_entry(entry, f"{path}: subject {i + 1}", base) for i, entry in enumerate(entries)]


def _spec_entry(entry, where: str, base: str) -> Subject:
    if not isinstance(entry, dict):
        raise UserError(f"{where} must be a JSON object, got {entry!r}")
    unknown = sorted(set(entry) - set(_SPEC_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(_SPEC_KEYS)})")
    for key in ("image", "label"):
        if key not in entry:
            raise UserError(f"{where} needs {key!r}")
    for key in ("image", "label", "mask"):
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise UserError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    if entry["image"] is None or entry["label"] is None:
        raise UserError(f"{where}: 'image' and 'label' cannot be null")
    box = entry.get("box")
    mask = entry.get("mask")
    return Subject(
        os.path.join(base, entry["image"]),
        entry["label"].strip(),
        os.path.join(base, mask) if mask is not None else None,
        None if box is None else check_box(box, f"{where}: 'box'"),
    )
