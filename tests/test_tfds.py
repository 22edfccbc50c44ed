"""The TFDS builder: record folders in, ArrayRecord TFDS out, read back without TensorFlow."""

import importlib.util
import json

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from sdjax.data import toy  # noqa: E402
from sdjax.data.shards import ShardWriter  # noqa: E402
from sdjax.data.tfds_builder import SdjaxRecords  # noqa: E402
from sdjax.errors import UserError  # noqa: E402

WORLD = toy.ToyWorld(size=32)


def _record_folder(path, split: str, n: int, per_shard: int) -> list:
    records = list(toy.generate(WORLD, n, seed=3, split=split))
    with ShardWriter(str(path), records_per_shard=per_shard) as writer:
        for record in records:
            writer.write(record)
    return records


def _assert_same(example: dict, record) -> None:
    assert example["image"] == record.image
    assert example["caption"].decode() == record.caption
    assert example["source_id"].decode() == record.source_id
    assert (example["width"], example["height"]) == (record.width, record.height)
    assert json.loads(example["attributes"]) == dict(record.attributes)
    subjects = example["subjects"]
    assert [label.decode() for label in subjects["label"]] == [s.label for s in record.subjects]
    assert subjects["mask"] == [s.mask for s in record.subjects]
    for box, score, attributes, subject in zip(
        subjects["box"], subjects["score"], subjects["attributes"], record.subjects
    ):
        np.testing.assert_array_equal(box, np.float32(subject.box))  # float32 in TFDS
        assert np.float32(score) == np.float32(subject.score)
        assert json.loads(attributes) == dict(subject.attributes)


def test_build_and_read_back_without_tensorflow(tmp_path):
    assert importlib.util.find_spec("tensorflow") is None  # the point of array_record
    train = _record_folder(tmp_path / "train", "train", 7, per_shard=3)
    heldout = _record_folder(tmp_path / "heldout", "heldout", 2, per_shard=5)
    data_dir = tmp_path / "tfds"
    builder = SdjaxRecords(
        splits={"train": str(tmp_path / "train"), "heldout": str(tmp_path / "heldout")},
        data_dir=str(data_dir),
    )
    builder.download_and_prepare()
    assert builder.info.splits["train"].num_examples == 7
    # Read through the registry by name, with nothing but the data folder.
    for split, records in [("train", train), ("heldout", heldout)]:
        source = tfds.data_source("sdjax_records", split=split, data_dir=str(data_dir))
        assert len(source) == len(records)
        by_id = {r.source_id: r for r in records}  # TFDS orders examples by key hash
        seen = set()
        for i in range(len(source)):
            example = source[i]
            record = by_id[example["source_id"].decode()]
            _assert_same(example, record)
            seen.add(record.source_id)
        assert seen == set(by_id)
    reread = SdjaxRecords(data_dir=str(data_dir)).as_data_source()
    assert len(reread["heldout"]) == 2


def test_building_needs_record_folders(tmp_path):
    with pytest.raises(UserError, match="splits"):
        SdjaxRecords(data_dir=str(tmp_path)).download_and_prepare()
