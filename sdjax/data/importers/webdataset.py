"""Importer for the authors' webdataset tars (the storage format of docs/method.md §5).

Per sample, members named `KEY.EXT` (KEY = the path up to the first dot of the file name,
as webdataset groups them; a sample's members are consecutive in the tar):

    jpg   the image (short side 800), stored as given
    txt   the original (alt-text) caption, kept as the record attribute `original_caption`
    png   the instance map: palette indices, pixel value i = instance i, 0 = background
    json  {"caption": BLIP-2 caption, "mask": [{"value": 0, "label": "background"},
           {"value": i, "label": ..., "logit": ..., "box": [x1, y1, x2, y2]}, ...]}

Every `mask` entry with a box becomes a subject: its label, its box (pixels), score = logit,
and as mask the dominant instance inside the box with holes filled, as the authors' loader
builds it. Tars are read with `tarfile` in streaming mode, so any size works.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator

import numpy as np
from PIL import Image

from sdjax import paths
from sdjax.data.filters import AUTHORS_FILTERS, FilterConfig, FilterReport, dominant_instance_mask
from sdjax.data.importers.common import Sample, import_records
from sdjax.data.records import Record, Subject, encode_mask
from sdjax.errors import UserError

REQUIRED = ("jpg", "png", "json")
_MEMBER = re.compile(r"^((?:.*/)?[^./][^./]*)\.([^/]+)$")  # (key, extension)

log = logging.getLogger(__name__)


def tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a webdataset tar (local or gs://), streamed
    in tar order."""
    key, members = None, {}
    try:
        with (
            paths.resolve(path).open("rb") as stream,
            tarfile.open(fileobj=stream, mode="r|*") as tar,
        ):
            for member in tar:
                match = _MEMBER.match(member.name)
                if not (member.isfile() and match):
                    continue
                if match[1] != key and members:
                    yield key, members
                    members = {}
                key = match[1]
                members[match[2].lower()] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as err:
        raise UserError(f"cannot read tar {path}: {err}") from None
    if members:
        yield key, members


def _subject(entry: dict, instances: np.ndarray) -> Subject:
    box = tuple(float(v) for v in entry["box"])
    if len(box) != 4:
        raise ValueError(f"box {entry['box']!r} is not [x1, y1, x2, y2]")
    return Subject(
        label=entry["label"].strip(),
        box=box,
        mask=encode_mask(dominant_instance_mask(instances, box)),
        score=float(entry["logit"]),
        attributes={"instance": str(entry["value"])},
    )


def sample_record(source_id: str, members: dict[str, bytes]) -> Sample:
    """One sample's record, with one 'label' reason per subject that has no label."""
    if any(ext not in members for ext in REQUIRED):
        log.warning("%s: missing %s", source_id, [e for e in REQUIRED if e not in members])
        return None, ["incomplete"]
    try:
        meta = json.loads(members["json"])
        with Image.open(io.BytesIO(members["jpg"])) as image:
            image.load()  # a damaged JPEG fails here, not in the filters
            width, height = image.size
        with Image.open(io.BytesIO(members["png"])) as png:
            instances = np.asarray(png)
        if instances.shape != (height, width):
            raise ValueError(f"instance map {instances.shape} is not [{height}, {width}]")
        entries = [e for e in meta["mask"] if "box" in e]
        named = [e for e in entries if str(e.get("label", "")).strip()]
        subjects = tuple(_subject(e, instances) for e in named)
        attributes = {"original_caption": members["txt"].decode()} if "txt" in members else {}
        record = Record(
            image=members["jpg"],
            caption=meta["caption"],
            source_id=source_id,
            width=width,
            height=height,
            subjects=subjects,
            attributes=attributes,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("%s: unreadable sample: %s", source_id, err)
        return None, ["unreadable"]
    return record, ["label"] * (len(entries) - len(named))


def import_webdataset(
    tars: list[str],
    out_dir: str,
    filters: FilterConfig | None = AUTHORS_FILTERS,
    records_per_shard: int = 1000,
    overwrite: bool = False,
) -> FilterReport:
    """Imports the authors' webdataset tars into the record folder `out_dir`."""
    for path in tars:
        if not os.path.isfile(path):
            raise UserError(f"tar {path} does not exist")
    samples = (
        sample_record(f"{os.path.basename(path)}/{key}", members)
        for path in tars
        for key, members in tar_samples(path)
    )
    provenance = {"generator": "import-webdataset", "sources": [os.path.abspath(p) for p in tars]}
    return import_records(
        samples,
        out_dir,
        filters=filters,
        provenance=provenance,
        records_per_shard=records_per_shard,
        overwrite=overwrite,
    )
