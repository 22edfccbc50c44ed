"""Curation input: the importers' formats, local or `gs://`, cut into numbered blocks.

Formats: a folder of images (searched recursively, sorted; source id = the path under the
folder), webdataset tars (img2dataset's layout, or the authors': per sample `KEY.jpg` /
`.png` / `.webp`, the alt text in `KEY.txt` kept as the attribute `original_caption`;
source id `TAR_NAME/KEY`), COCO (an instances JSON's images, sorted by id, from its image
folder; source id `coco/FILE_NAME`, as the importer names them). Any path may be a `gs://`
URL (`sdjax.paths`); a tar argument may hold `*` (`gs://b/laion/*.tar`, sorted matches).

The input is cut into units, each read by one worker: a listing of files (folder, COCO)
becomes units of `chunk_size` files, a tar is one unit. Within a unit, images are cut into
blocks of `chunk_size` in reading order. Block `(u, k)` is images `k * chunk_size` ... of
unit `u` (a listing's units are all unit 0, block k); it becomes the shard
`shard-UUUUU-KKKKK.array_record`. So a block's content, its shard's name and the order of
records in it depend on the input alone, never on the runner or the worker count.

A listing is made where the command runs and travels in the job's description; for
millions of images use tars (a unit is then one path).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from sdjax import paths
from sdjax.data.curation.stages import Raw
from sdjax.data.importers.webdataset import tar_samples
from sdjax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
_TAR_IMAGES = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Unit:
    """A piece of input one worker reads: files `(source_id, path or bytes)` that make
    block `(0, first_block)`, or a tar (`tar`) that is unit `number`."""

    number: int
    first_block: int = 0
    files: tuple[tuple[str, str | bytes], ...] = ()
    tar: str | None = None


def block_name(block: tuple[int, int]) -> str:
    return f"{block[0]:05d}-{block[1]:05d}"


def listing_units(files: list[tuple[str, str | bytes]], chunk_size: int) -> list[Unit]:
    """Units of `chunk_size` files: (source id, path or the image's bytes) in input order."""
    return [
        Unit(0, k, tuple(files[start : start + chunk_size]))
        for k, start in enumerate(range(0, len(files), chunk_size))
    ]


def folder_files(root: str) -> list[tuple[str, str]]:
    """(path relative to root, path) of every image file under root, sorted by that path
    (folders whose name starts with '.' are skipped)."""
    if not paths.isdir(root):
        raise UserError(f"image folder {root} does not exist")
    base = str(paths.resolve(root)).rstrip("/")
    found = sorted(
        (rel, f"{base}/{rel}")
        for rel in _files_under(base)
        if rel.lower().endswith(IMAGE_EXTENSIONS)
        and not any(part.startswith(".") for part in rel.split("/")[:-1])
    )
    if not found:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return found


def _files_under(base: str) -> list[str]:
    """Every file's path under `base`, relative to it ('/'-separated); one listing on GCS."""
    if paths.is_remote(base):
        import fsspec

        paths.configure_gcs()
        prefix = base.removeprefix("gs://") + "/"
        return [name.removeprefix(prefix) for name in fsspec.filesystem("gs").find(base)]
    return [
        os.path.relpath(os.path.join(folder, name), base).replace(os.sep, "/")
        for folder, _, names in os.walk(base)
        for name in names
    ]


def coco_files(instances: str, images: str) -> list[tuple[str, str]]:
    """(coco/FILE_NAME, path) of a COCO instances file's images, sorted by image id."""
    try:
        data = json.loads(paths.read_text(instances))
        entries = sorted(data["images"], key=lambda image: image["id"])
        return [(f"coco/{e['file_name']}", paths.join(images, e["file_name"])) for e in entries]
    except FileNotFoundError:
        raise UserError(f"COCO instances file {instances} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read COCO instances file {instances}: {err!r}") from None


def tar_files(patterns: list[str]) -> list[str]:
    """The tars named, a `*` in a name expanded to its sorted matches."""
    found = []
    for pattern in patterns:
        if "*" in os.path.basename(pattern):
            folder, name = pattern.rsplit("/", 1) if "/" in pattern else (".", pattern)
            matches = sorted(str(p) for p in paths.resolve(folder).glob(name))
            if not matches:
                raise UserError(f"no tars match {pattern}")
            found += matches
        elif not paths.exists(pattern):
            raise UserError(f"tar {pattern} does not exist")
        else:
            found.append(str(paths.resolve(pattern)))
    return found


def input_units(
    sources: list[str], chunk_size: int, instances: str | None = None
) -> tuple[list[Unit], dict]:
    """The units of the command line's sources, and a description of the input.

    `instances` set: COCO, `sources` = [its image folder]; all sources tars: webdataset;
    else one folder of images."""
    if instances is not None:
        if len(sources) != 1:
            raise UserError("COCO input takes one image folder beside --instances")
        files = coco_files(instances, sources[0])
        kind = "coco"
    elif all(s.lower().endswith(TAR_EXTENSIONS) for s in sources):
        tars = tar_files(sources)
        units = [Unit(number, tar=path) for number, path in enumerate(tars)]
        return units, {"format": "webdataset", "sources": tars, "fingerprint": _digest(tars)}
    elif len(sources) == 1:
        files = folder_files(sources[0])
        kind = "folder"
    else:
        raise UserError("give one image folder, or webdataset tars (.tar), as the input")
    described = {"format": kind, "sources": [str(paths.resolve(s)) for s in sources]}
    described["fingerprint"] = _digest([source_id for source_id, _ in files])
    return listing_units(files, chunk_size), described


def items_description(files: list[tuple[str, str | bytes]]) -> dict:
    """The description of an in-memory listing (tests, the API)."""
    return {"format": "items", "fingerprint": _digest([source_id for source_id, _ in files])}


def _digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def read_unit(unit: Unit, chunk_size: int, skip: frozenset = frozenset()) -> Iterator[Raw]:
    """The unit's images in order, as `Raw` (data None when unreadable); the images of
    blocks in `skip` (already written) are passed over unread."""
    if unit.tar is None:
        block = (0, unit.first_block)
        if block in skip:
            return
        for position, (source_id, file) in enumerate(unit.files):
            yield Raw(block, position, source_id, _file_bytes(file))
        return
    name = os.path.basename(unit.tar)
    for index, (key, members) in enumerate(tar_samples(unit.tar)):
        block = (unit.number, index // chunk_size)
        if block in skip:
            continue
        image = next((members[e] for e in _TAR_IMAGES if e in members), None)
        attributes = {"original_caption": members["txt"].decode()} if "txt" in members else {}
        yield Raw(block, index % chunk_size, f"{name}/{key}", image, attributes)


def _file_bytes(file: str | bytes) -> bytes | None:
    if isinstance(file, bytes):
        return file
    try:
        return paths.read_bytes(file)
    except OSError:
        return None
