"""Importer for COCO instance annotations (pycocotools: polygons, RLE and uncompressed RLE).

Each image with its annotations becomes a record: per non-crowd annotation a subject with
the category name as label, the COCO box `[x, y, w, h]` as `(x, y, x + w, y + h)`, the
decoded mask and score 1 (ground truth). Crowd annotations cover many objects, so they are
left out (reason 'crowd'). Subjects are ordered by area, largest first, as the authors'
COCO loader picks them. The caption is the image's first caption (lowest annotation id) in
a COCO captions file, or else the category names joined ("person, dog, frisbee").

The default filters skip the label test, as the authors do for COCO: category names can
be two words ("teddy bear") and captions name things their own way.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os

from PIL import Image

from sdjax.data.filters import FilterConfig, FilterReport
from sdjax.data.importers.common import Sample, import_records
from sdjax.data.records import Record, Subject, encode_mask
from sdjax.errors import UserError

COCO_FILTERS = FilterConfig(check_label=False)

log = logging.getLogger(__name__)


def _read_json(path: str, what: str, keys: tuple[str, ...]) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} file {path} does not exist") from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {what} file {path}: {err}") from None
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise UserError(f"{what} file {path} is not COCO format (needs {', '.join(keys)})")
    return data


def _coco(instances: str):
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise UserError("the COCO importer needs pycocotools (the curate extra)") from None

    coco = COCO()
    coco.dataset = _read_json(instances, "COCO instances", ("images", "annotations", "categories"))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


def first_captions(path: str) -> dict[int, str]:
    """image id -> its first caption (lowest annotation id) in a COCO captions file."""
    annotations = _read_json(path, "COCO captions", ("annotations",))["annotations"]
    captions: dict[int, str] = {}
    for ann in sorted(annotations, key=lambda a: a["id"]):
        captions.setdefault(ann["image_id"], ann["caption"].strip())
    return captions


def _subject(coco, ann: dict) -> Subject:
    x, y, w, h = (float(v) for v in ann["bbox"])
    return Subject(
        label=coco.cats[ann["category_id"]]["name"],
        box=(x, y, x + w, y + h),
        mask=encode_mask(coco.annToMask(ann).astype(bool)),
        score=1.0,
        attributes={"annotation_id": str(ann["id"])},
    )


def coco_record(coco, image_id: int, images_dir: str, captions: dict[int, str]) -> Sample:
    """The record of one COCO image, with a 'crowd' reason per crowd annotation."""
    info = coco.imgs[image_id]
    path = os.path.join(images_dir, info["file_name"])
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size = image.size
    except OSError as err:
        log.warning("%s: unreadable image: %s", path, err)
        return None, ["unreadable"]
    if size != (info["width"], info["height"]):
        log.warning("%s is %s, the annotations say %s", path, size, (info["width"], info["height"]))
        return None, ["size_mismatch"]
    annotations = sorted(coco.imgToAnns[image_id], key=lambda a: -a.get("area", 0))
    try:
        subjects = tuple(_subject(coco, a) for a in annotations if not a.get("iscrowd", 0))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        log.warning("%s: unusable annotation: %r", path, err)
        return None, ["bad_annotation"]
    names = list(dict.fromkeys(s.label for s in subjects))
    record = Record(
        image=data,
        caption=captions.get(image_id, ", ".join(names)),
        source_id=f"coco/{info['file_name']}",
        width=size[0],
        height=size[1],
        subjects=subjects,
        attributes={"coco_image_id": str(image_id)},
    )
    return record, ["crowd"] * (len(annotations) - len(subjects))


def import_coco(
    instances: str,
    images_dir: str,
    out_dir: str,
    captions: str | None = None,
    filters: FilterConfig | None = COCO_FILTERS,
    records_per_shard: int = 1000,
    overwrite: bool = False,
) -> FilterReport:
    """Imports COCO images with their instance annotations into the record folder `out_dir`."""
    if not os.path.isdir(images_dir):
        raise UserError(f"image folder {images_dir} does not exist")
    coco = _coco(instances)
    caption_of = first_captions(captions) if captions else {}
    image_ids = sorted(coco.imgs)
    provenance = {
        "generator": "import-coco",
        "instances": os.path.abspath(instances),
        "captions": captions and os.path.abspath(captions),
    }
    return import_records(
        (coco_record(coco, i, images_dir, caption_of) for i in image_ids),
        out_dir,
        filters=filters,
        provenance=provenance,
        records_per_shard=records_per_shard,
        overwrite=overwrite,
        total=len(image_ids),
    )
