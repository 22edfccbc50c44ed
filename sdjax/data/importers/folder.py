"""Importer for a folder of images, each with a sidecar JSON of the same name.

`photos/dog.jpg` + `photos/dog.json`:

    {"caption": "a dog with a ball on the grass",
     "subjects": [{"label": "dog", "box": [x1, y1, x2, y2], "mask": "dog_mask.png",
                   "score": 0.9}, ...]}

Boxes are in pixels. `mask` (optional) is a single-channel PNG of the image's size, a path
relative to the JSON's folder, >= 128 = subject; without it the mask is the box's
rectangle. `score` is optional (default 1). Sidecars are searched recursively (folders
starting with '.' are skipped); JPEG and PNG images are stored as given, other formats as
PNG. A sidecar without its image is skipped ('no_image'), a malformed one too
('bad_sidecar', with a warning naming it). Images without a sidecar are not looked at.
"""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
from PIL import Image

from sdjax.data.filters import AUTHORS_FILTERS, FilterConfig, FilterReport, box_window
from sdjax.data.importers.common import Sample, import_records
from sdjax.data.records import Record, Subject, encode_image, encode_mask
from sdjax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

log = logging.getLogger(__name__)


def _mask(entry: dict, box: tuple, folder: str, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    if "mask" not in entry:
        mask = np.zeros((height, width), bool)
        mask[box_window(box, mask.shape)] = True
        return mask
    with Image.open(os.path.join(folder, entry["mask"])) as image:
        mask = np.asarray(image.convert("L")) >= 128
    if mask.shape != (height, width):
        raise ValueError(f"mask {entry['mask']} is {mask.shape[::-1]}, the image {size}")
    return mask


def _subject(entry: dict, folder: str, size: tuple[int, int]) -> Subject:
    box = tuple(float(v) for v in entry["box"])
    if len(box) != 4:
        raise ValueError(f"box {entry['box']!r} is not [x1, y1, x2, y2]")
    return Subject(
        label=entry["label"],
        box=box,
        mask=encode_mask(_mask(entry, box, folder, size)),
        score=float(entry.get("score", 1.0)),
    )


def sidecars(root: str) -> list[str]:
    """Every .json file under root, in sorted order."""
    if not os.path.isdir(root):
        raise UserError(f"folder {root} does not exist")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(".json")]
    if not found:
        raise UserError(f"no sidecar .json files under {root}")
    return found


def _image_of(sidecar: str) -> str | None:
    stem = os.path.splitext(sidecar)[0]
    folder, name = os.path.split(stem)
    for file in sorted(os.listdir(folder or ".")):
        base, ext = os.path.splitext(file)
        if base == name and ext.lower() in IMAGE_EXTENSIONS:
            return os.path.join(folder, file)
    return None


def folder_record(source_id: str, sidecar: str) -> Sample:
    """The record of one sidecar and its image."""
    path = _image_of(sidecar)
    if path is None:
        log.warning("%s: no image of that name (%s)", sidecar, ", ".join(IMAGE_EXTENSIONS))
        return None, ["no_image"]
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
            if opened.format not in ("JPEG", "PNG"):
                data = encode_image(np.asarray(image), "PNG")
    except OSError as err:
        log.warning("%s: unreadable image: %s", path, err)
        return None, ["unreadable"]
    try:
        with open(sidecar) as f:
            meta = json.load(f)
        folder = os.path.dirname(sidecar)
        subjects = tuple(_subject(entry, folder, image.size) for entry in meta["subjects"])
        record = Record(
            image=data,
            caption=meta["caption"],
            source_id=source_id,
            width=image.width,
            height=image.height,
            subjects=subjects,
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s: bad sidecar: %r", sidecar, err)
        return None, ["bad_sidecar"]
    return record, []


def import_folder(
    root: str,
    out_dir: str,
    filters: FilterConfig | None = AUTHORS_FILTERS,
    records_per_shard: int = 1000,
    overwrite: bool = False,
) -> FilterReport:
    """Imports the sidecars under `root` with their images into the record folder `out_dir`."""
    found = sidecars(root)
    return import_records(
        (folder_record(os.path.relpath(path, root), path) for path in found),
        out_dir,
        filters=filters,
        provenance={"generator": "import-folder", "root": os.path.abspath(root)},
        records_per_shard=records_per_shard,
        overwrite=overwrite,
        total=len(found),
    )
