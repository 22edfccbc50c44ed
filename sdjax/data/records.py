"""The training record: one image, its caption and its subjects, with a checksummed encoding.

Every data source (the toy world, importers, the curation pipeline) writes this schema and
the input pipeline reads only it. A record holds the image as encoded bytes (JPEG or PNG,
as given) of size `width` x `height`, and per subject a label (one word of the caption), a
box `(x1, y1, x2, y2)` in pixels (pixel-edge coordinates: a box around pixel columns 3..5
is x1=3, x2=6), a mask (single-channel PNG, same size as the image, 255 = subject), the
detector score and free-form string attributes.

Binary layout of `Record.encode()` (schema version `SCHEMA_VERSION`):

    bytes 0..3   magic b"SDJR"
    bytes 4..7   CRC-32 (zlib) of the payload, unsigned little-endian
    bytes 8..    payload: a msgpack map
                 {"schema": 1, "image": bin, "caption": str, "source_id": str,
                  "width": int, "height": int, "attributes": {str: str},
                  "subjects": [{"label": str, "box": [float64 x 4], "mask": bin,
                                "score": float64, "attributes": {str: str}}, ...]}

Floats are stored as float64, so a round trip is bit-identical. Any damage (a flipped byte,
a short read, a foreign payload, another schema version) makes `decode` raise
`CorruptRecord`. Nothing here unpickles.
"""

from __future__ import annotations

import io
import struct
import types
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgpack
import numpy as np
from PIL import Image

from sdjax.errors import UserError

SCHEMA_VERSION = 1
_MAGIC = b"SDJR"
_HEADER = struct.Struct("<4sI")


class CorruptRecord(UserError):
    """Bytes that are not an intact record of this schema version."""


def _frozen_attributes(attributes: Mapping[str, str]) -> Mapping[str, str]:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()):
        raise TypeError(f"attributes must map str to str, got {dict(attributes)!r}")
    return types.MappingProxyType(dict(attributes))


@dataclass(frozen=True)
class Subject:
    """One subject of an image: a caption word, where it is, and how sure the detector was."""

    label: str
    box: tuple[float, float, float, float]
    mask: bytes = field(repr=False)
    score: float = 1.0
    attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.label, str) or not self.label:
            raise TypeError(f"subject label must be a non-empty str, got {self.label!r}")
        if len(self.box) != 4:
            raise ValueError(f"subject box must be (x1, y1, x2, y2), got {self.box!r}")
        if not isinstance(self.mask, bytes):
            raise TypeError("subject mask must be PNG bytes")
        object.__setattr__(self, "box", tuple(float(v) for v in self.box))
        object.__setattr__(self, "score", float(self.score))
        object.__setattr__(self, "attributes", _frozen_attributes(self.attributes))

    def _payload(self) -> dict:
        return {
            "label": self.label,
            "box": list(self.box),
            "mask": self.mask,
            "score": self.score,
            "attributes": dict(self.attributes),
        }


@dataclass(frozen=True)
class Record:
    """One training example; see the module docstring for the field conventions."""

    image: bytes = field(repr=False)
    caption: str
    source_id: str
    width: int
    height: int
    subjects: tuple[Subject, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.image, bytes):
            raise TypeError("record image must be JPEG or PNG bytes")
        if not (isinstance(self.caption, str) and isinstance(self.source_id, str)):
            raise TypeError("record caption and source_id must be str")
        if not (isinstance(self.width, int) and isinstance(self.height, int)):
            raise TypeError(f"record size must be ints, got {self.width!r} x {self.height!r}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"record size must be positive, got {self.width} x {self.height}")
        object.__setattr__(self, "subjects", tuple(self.subjects))
        if not all(isinstance(s, Subject) for s in self.subjects):
            raise TypeError("record subjects must be Subject instances")
        object.__setattr__(self, "attributes", _frozen_attributes(self.attributes))

    def encode(self) -> bytes:
        """The checksummed binary form (layout in the module docstring)."""
        payload = msgpack.packb(
            {
                "schema": SCHEMA_VERSION,
                "image": self.image,
                "caption": self.caption,
                "source_id": self.source_id,
                "width": self.width,
                "height": self.height,
                "attributes": dict(self.attributes),
                "subjects": [s._payload() for s in self.subjects],
            },
            use_bin_type=True,
        )
        return _HEADER.pack(_MAGIC, zlib.crc32(payload)) + payload

    @classmethod
    def decode(cls, data: bytes) -> Record:
        """The record `encode` wrote; `CorruptRecord` for anything else."""
        payload = _checked_payload(data)
        try:
            fields = msgpack.unpackb(payload, raw=False, strict_map_key=True)
            version = fields.pop("schema")
        except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException) as err:
            raise CorruptRecord(f"undecodable record payload: {err}") from None
        if version != SCHEMA_VERSION:
            raise CorruptRecord(f"record schema version {version!r}, expected {SCHEMA_VERSION}")
        try:
            subjects = tuple(Subject(**s) for s in fields.pop("subjects"))
            return cls(subjects=subjects, **fields)
        except (TypeError, ValueError, KeyError) as err:
            raise CorruptRecord(
                f"record fields do not match schema {SCHEMA_VERSION}: {err}"
            ) from None


def _checked_payload(data: bytes) -> memoryview:
    if len(data) < _HEADER.size:
        raise CorruptRecord(f"record of {len(data)} bytes is shorter than its header")
    magic, crc = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise CorruptRecord(f"not an sdjax record (magic {magic!r})")
    payload = memoryview(data)[_HEADER.size :]
    if zlib.crc32(payload) != crc:
        raise CorruptRecord("record checksum mismatch")
    return payload


def image_array(record: Record) -> np.ndarray:
    """The record's image as uint8 [H, W, 3] RGB."""
    with Image.open(io.BytesIO(record.image)) as im:
        return np.asarray(im.convert("RGB"))


def mask_array(subject: Subject) -> np.ndarray:
    """The subject's mask as bool [H, W] (True = subject)."""
    with Image.open(io.BytesIO(subject.mask)) as im:
        return np.asarray(im.convert("L")) >= 128


def encode_image(array: np.ndarray, format: str = "PNG", quality: int = 95) -> bytes:
    """uint8 [H, W, 3] -> PNG (lossless) or JPEG bytes."""
    buffer = io.BytesIO()
    options = {"quality": quality} if format == "JPEG" else {"compress_level": 6}
    Image.fromarray(np.asarray(array, np.uint8), "RGB").save(buffer, format=format, **options)
    return buffer.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """bool [H, W] -> single-channel PNG bytes, 255 = subject."""
    buffer = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L").save(buffer, format="PNG")
    return buffer.getvalue()
