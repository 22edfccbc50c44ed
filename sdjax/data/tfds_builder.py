"""A TFDS dataset made from sdjax record folders (extra `tfds`; TensorFlow is not needed).

`SdjaxRecords(splits={"train": RECORD_DIR, ...}, data_dir=DIR).download_and_prepare()`
writes a TFDS dataset in ArrayRecord files; it reads back with `tfds.data_source(
"sdjax_records", data_dir=DIR)` (or `builder.as_data_source()`), again without TensorFlow.
One example per record, keyed by its source id:

    image        bytes (JPEG or PNG as stored)       caption, source_id   text
    width, height int32                               attributes          text (JSON object)
    subjects     sequence of {label: text, box: float32 [4] (x1, y1, x2, y2 pixels),
                              mask: bytes (PNG), score: float32, attributes: text (JSON)}

TFDS serialises floats as float32 (tf.train.Example has no float64), so boxes and scores
come back rounded to float32; everything else is exact. Images are `Tensor(shape=(),
dtype=object)` bytes, not `Image` features, because writing those needs TensorFlow.
Reading a built dataset needs only the `name` and `data_dir`, not the record folders.

Large folders (a Beam curation's output, `sdjax data curate --beam`) build with TFDS's own
Beam support: `SdjaxRecords(splits=..., beam=True)` reads each shard in a Beam worker, and
`download_and_prepare(download_config=tfds.download.DownloadConfig(beam_options=
PipelineOptions([...])))` runs it on the DirectRunner, Dataflow, Flink or Spark.
"""

from __future__ import annotations

import json

import numpy as np
import tensorflow_datasets as tfds

from sdjax import paths
from sdjax.data.records import Record
from sdjax.data.shards import RecordSource, read_manifest
from sdjax.errors import UserError


def _json(attributes) -> str:
    return json.dumps(dict(attributes), sort_keys=True, ensure_ascii=False)


def example(record: Record) -> dict:
    """A record as a TFDS example of `SdjaxRecords`'s features."""
    return {
        "image": record.image,
        "caption": record.caption,
        "source_id": record.source_id,
        "width": record.width,
        "height": record.height,
        "attributes": _json(record.attributes),
        "subjects": [
            {
                "label": s.label,
                "box": np.asarray(s.box, np.float32),
                "mask": s.mask,
                "score": np.float32(s.score),
                "attributes": _json(s.attributes),
            }
            for s in record.subjects
        ],
    }


class SdjaxRecords(tfds.core.GeneratorBasedBuilder):
    """sdjax record folders as a TFDS dataset stored in ArrayRecord files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sdjax record schema 1."}

    def __init__(self, *, splits: dict[str, str] | None = None, beam: bool = False, **kwargs):
        """`splits`: split name -> record folder; needed to build, not to read. `beam`:
        generate with Apache Beam, one shard per element (see the module docstring)."""
        kwargs.setdefault("file_format", "array_record")
        self._record_dirs = dict(splits or {})
        self._beam = beam
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text, data = tfds.features.Text(), tfds.features.Tensor(shape=(), dtype=np.object_)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Images with captions and subjects (label, box, mask, score).",
            features=tfds.features.FeaturesDict(
                {
                    "image": data,
                    "caption": text,
                    "source_id": text,
                    "width": tfds.features.Scalar(dtype=np.int32),
                    "height": tfds.features.Scalar(dtype=np.int32),
                    "attributes": text,
                    "subjects": tfds.features.Sequence(
                        {
                            "label": text,
                            "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                            "mask": data,
                            "score": tfds.features.Scalar(dtype=np.float32),
                            "attributes": text,
                        }
                    ),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        if not self._record_dirs:
            raise UserError("SdjaxRecords needs splits={name: record folder} to build")
        return {name: self._generate_examples(root) for name, root in self._record_dirs.items()}

    def _generate_examples(self, root: str):
        return _beam_examples(root) if self._beam else _examples(root)


def _examples(root: str):
    source = RecordSource(root)
    for i in range(len(source)):
        record = source[i]
        if record is None:
            raise UserError(f"{root}: record {i} is damaged")
        yield record.source_id, example(record)


def _beam_examples(root: str):
    """A PTransform making (source id, example) from every shard of a record folder."""
    import apache_beam as beam

    shards = read_manifest(root)["shards"]
    return beam.Create([(root, shard) for shard in shards]) | beam.FlatMapTuple(_shard_examples)


def _shard_examples(root: str, shard: dict):
    import grain

    path = paths.local_copy(paths.join(root, shard["file"]), expected_size=shard["bytes"])
    source = grain.sources.ArrayRecordDataSource([path])
    if len(source) != shard["count"]:
        raise UserError(
            f"shard {path} has {len(source)} records, the manifest says {shard['count']}"
        )
    for i in range(len(source)):
        record = Record.decode(source[i])
        yield record.source_id, example(record)
