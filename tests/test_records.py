"""The record schema and record folders: exact round trips, damage found, mismatches refused."""

import io
import json
import logging
import os
import pickle
import struct
import zlib

import grain
import msgpack
import numpy as np
import pytest
from PIL import Image

from sdjax.data.records import (
    SCHEMA_VERSION,
    CorruptRecord,
    Record,
    Subject,
    encode_image,
    encode_mask,
    image_array,
    mask_array,
)
from sdjax.data.shards import MANIFEST, RecordSource, ShardWriter
from sdjax.errors import UserError

RNG = np.random.default_rng(0)


def _record(i: int, fmt: str = "PNG") -> Record:
    pixels = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    mask = np.zeros((12, 20), bool)
    mask[2 : 5 + i % 5, 3:9] = True
    subject = Subject(
        label="dog",
        box=(3.0, 2.0, 9.0, 5.0 + i % 5),
        mask=encode_mask(mask),
        score=0.1 + 0.2,  # not exactly representable: must come back bit for bit
        attributes={"colour": "brün", "i": str(i)},
    )
    second = Subject(label="ball", box=(1e-300, 0.5, 19.75, 11.0), mask=encode_mask(~mask))
    return Record(
        image=encode_image(pixels, fmt),
        caption=f"record-{i:04d}: a dog and a ball",
        source_id=f"test/{i}",
        width=20,
        height=12,
        subjects=(subject, second),
        attributes={"licence": "cc0"},
    )


def test_round_trip_is_bit_identical():
    for fmt in ("PNG", "JPEG"):
        record = _record(3, fmt)
        data = record.encode()
        back = Record.decode(data)
        assert back == record
        assert back.encode() == data
        assert back.image == record.image and back.subjects[0].mask == record.subjects[0].mask
        assert struct.pack("<d", back.subjects[0].score) == struct.pack("<d", 0.1 + 0.2)
        assert back.subjects[1].box[0] == 1e-300
        assert dict(back.subjects[0].attributes) == {"colour": "brün", "i": "3"}


def test_image_and_mask_arrays():
    pixels = RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    mask = RNG.random((6, 9)) > 0.5
    subject = Subject("cat", (0, 0, 9, 6), encode_mask(mask))
    record = Record(encode_image(pixels), "a cat", "x", 9, 6, (subject,))
    np.testing.assert_array_equal(image_array(record), pixels)
    assert image_array(record).dtype == np.uint8
    got = mask_array(subject)
    assert got.dtype == bool and got.shape == (6, 9)
    np.testing.assert_array_equal(got, mask)
    with Image.open(io.BytesIO(subject.mask)) as im:
        assert im.mode == "L" and set(np.unique(np.asarray(im))) <= {0, 255}


@pytest.mark.parametrize("position", [0, 5, 9, 40, -1])
def test_flipped_byte_is_detected(position):
    data = bytearray(_record(1).encode())
    data[position] ^= 0x10
    with pytest.raises(CorruptRecord):
        Record.decode(bytes(data))


def test_short_foreign_and_future_records_are_corrupt():
    data = _record(1).encode()
    for bad in (data[:6], data[:-3], b"PK\x03\x04" + data[4:]):
        with pytest.raises(CorruptRecord):
            Record.decode(bad)
    # A checksum-valid payload of another schema version names the version.
    fields = msgpack.unpackb(data[8:])
    fields["schema"] = SCHEMA_VERSION + 1
    payload = msgpack.packb(fields)
    future = b"SDJR" + struct.pack("<I", zlib.crc32(payload)) + payload
    with pytest.raises(CorruptRecord, match=f"version {SCHEMA_VERSION + 1}"):
        Record.decode(future)


def test_invalid_fields_are_refused():
    with pytest.raises(ValueError):
        Subject("dog", (1, 2, 3), b"")
    with pytest.raises(TypeError):
        Subject("dog", (1, 2, 3, 4), b"", attributes={"n": 1})
    with pytest.raises(ValueError):
        Record(b"", "c", "s", 0, 4)


def _write(root, n=25, per_shard=10, corrupt=()):
    with ShardWriter(str(root), per_shard, provenance={"generator": "test"}) as writer:
        for i in range(n):
            data = bytearray(_record(i).encode())
            if i in corrupt:
                data[len(data) // 2] ^= 0xFF  # damaged before it reached the shard
            writer.write_encoded(bytes(data))


def test_shards_and_manifest(tmp_path):
    _write(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["count"] == 25
    assert [s["count"] for s in manifest["shards"]] == [10, 10, 5]
    assert [s["file"] for s in manifest["shards"]] == [
        f"shard-0000{i}.array_record" for i in range(3)
    ]
    assert all(s["bytes"] == os.path.getsize(tmp_path / s["file"]) for s in manifest["shards"])
    assert manifest["provenance"] == {"generator": "test"}
    source = RecordSource(str(tmp_path))
    assert len(source) == 25
    assert [source[i].caption for i in (0, 9, 10, 24)] == [
        f"record-{i:04d}: a dog and a ball" for i in (0, 9, 10, 24)
    ]
    # grain hands sources to worker processes pickled: the clone must read the same.
    clone = pickle.loads(pickle.dumps(source))
    assert clone[13] == source[13] and clone.corrupt_count == 0
    dataset = grain.MapDataset.source(source).filter(lambda r: r is not None)
    dataset = dataset.to_iter_dataset().batch(5)
    assert sum(len(batch) for batch in dataset) == 25


def test_corrupt_record_is_none_and_counted(tmp_path, caplog):
    _write(tmp_path, corrupt={12})
    source = RecordSource(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="sdjax.data.shards"):
        records = [source[i] for i in range(len(source))]
    assert records[12] is None and source.corrupt_count == 1
    assert all(r is not None for i, r in enumerate(records) if i != 12)
    assert "corrupt record 12" in caplog.text


def test_flipped_byte_in_shard_file(tmp_path):
    _write(tmp_path, n=8, per_shard=8)
    path = tmp_path / "shard-00000.array_record"
    data = bytearray(path.read_bytes())
    at = data.index(b"record-0005")  # the caption is stored as is
    data[at + 3] ^= 0x01
    path.write_bytes(bytes(data))
    source = RecordSource(str(tmp_path))
    records = [source[i] for i in range(8)]
    assert records[5] is None and source.corrupt_count == 1
    assert [r.caption[:11] for i, r in enumerate(records) if i != 5] == [
        f"record-000{i}" for i in range(8) if i != 5
    ]


def test_corrupt_summaries_stay_short(tmp_path, caplog):
    _write(tmp_path, n=12, per_shard=12, corrupt=set(range(12)))
    source = RecordSource(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="sdjax.data.shards"):
        assert all(source[i] is None for i in range(12))
    assert source.corrupt_count == 12
    assert len(caplog.records) == 7  # five one by one, then summaries at 6 and 10


def _edit_manifest(root, edit):
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: os.remove(root / "shard-00001.array_record"), "shard-00001.array_record"),
        (lambda root: os.remove(root / MANIFEST), "no manifest.json"),
        (
            lambda root: _edit_manifest(root, lambda m: m["shards"][0].update(count=11)),
            "do not add up",
        ),
        (
            lambda root: _edit_manifest(
                root, lambda m: (m["shards"][0].update(count=11), m.update(count=26))
            ),
            "has 10 records",
        ),
        (lambda root: _edit_manifest(root, lambda m: m.update(schema_version=99)), "version 99"),
        (lambda root: (root / "shard-00002.array_record").write_bytes(b"x" * 10), "has 10 bytes"),
        (lambda root: (root / MANIFEST).write_text("{not json"), "cannot read"),
    ],
)
def test_manifest_mismatch_is_one_line_user_error(tmp_path, damage, message):
    _write(tmp_path)
    damage(tmp_path)
    with pytest.raises(UserError, match=message) as err:
        RecordSource(str(tmp_path))
    assert "\n" not in str(err.value)


def test_truncated_shard_of_listed_size_is_unreadable(tmp_path):
    _write(tmp_path, n=4, per_shard=4)
    path = tmp_path / "shard-00000.array_record"
    data = path.read_bytes()
    end = len(data.rstrip(b"\0"))  # ArrayRecord's footer ends where the zero padding starts
    path.write_bytes(data[: end - 40] + bytes(len(data) - end + 40))  # same size
    with pytest.raises(UserError, match="unreadable"):
        RecordSource(str(tmp_path))


def test_writer_refuses_non_empty_folder_and_overwrites_on_request(tmp_path):
    _write(tmp_path, n=25)
    with pytest.raises(UserError, match="not empty"):
        ShardWriter(str(tmp_path))
    (tmp_path / "notes.txt").write_text("kept")
    with ShardWriter(str(tmp_path), 10, overwrite=True) as writer:
        writer.write(_record(0))
    assert sorted(os.listdir(tmp_path)) == [MANIFEST, "notes.txt", "shard-00000.array_record"]
    assert len(RecordSource(str(tmp_path))) == 1


def test_failed_write_leaves_no_manifest(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(str(tmp_path)) as writer:
        writer.write(_record(0))
        raise RuntimeError("generator crashed")
    assert not (tmp_path / MANIFEST).exists()
    with pytest.raises(UserError, match="unfinished"):
        RecordSource(str(tmp_path))
