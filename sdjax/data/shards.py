"""A folder of records: ArrayRecord shards plus a manifest, and grain's view of it.

Layout of a record folder:

    shard-00000.array_record ...   encoded `Record`s (`records.py`), one per ArrayRecord
                                   entry, group_size 1 (random access), uncompressed
                                   (JPEG/PNG bytes do not compress further)
    manifest.json                  {"schema_version": 1, "count": N, "shards": [{"file",
                                   "count", "bytes"}, ...], "provenance": {...}}

The manifest is written last and atomically, so a folder without one is an unfinished
write. A folder may be local or a `gs://` URL (`sdjax.paths`): ArrayRecord needs local
files, so shards bound for a bucket are written to a local staging folder and uploaded as
each one closes, and shards of a bucket are read from a local cache (`paths.local_copy`,
checked against the manifest's sizes). For datasets larger than a host's disk, mount the
bucket (gcsfuse) and give the mount's path.

`RecordSource` checks the manifest against the shards when it opens (one-line `UserError`
on any mismatch) and, mid-epoch, turns damaged records into `None` instead of
raising: both ArrayRecord's chunk hashes and the record's own CRC are checked.
"""

from __future__ import annotations

import json
import logging
import os
import threading

from sdjax import paths
from sdjax.data.records import SCHEMA_VERSION, CorruptRecord, Record
from sdjax.errors import UserError

MANIFEST = "manifest.json"
_SHARD_PATTERN = "shard-{:05d}.array_record"
# Random access needs one record per chunk; the payloads are already-compressed images.
_WRITER_OPTIONS = "group_size:1,uncompressed"
_WARN_EACH = 5  # corrupt records logged one by one before switching to summaries

log = logging.getLogger(__name__)


def _dataset_files(out_dir: str) -> list[str]:
    """The manifest and shards of a previous dataset in `out_dir` (what overwrite removes)."""
    return [
        paths.join(out_dir, n)
        for n in paths.listdir(out_dir)
        if n == MANIFEST or (n.startswith("shard-") and n.endswith(".array_record"))
    ]


class ShardWriter:
    """Writes records into `out_dir` as numbered shards; `close()` writes the manifest.

    A folder that already holds anything is refused unless `overwrite`, which removes a
    previous dataset's manifest and shards (and nothing else). Used as a context manager,
    an exception inside the block leaves no manifest, so the folder never reads as complete.
    """

    def __init__(
        self,
        out_dir: str,
        records_per_shard: int = 1000,
        provenance: dict | None = None,
        overwrite: bool = False,
    ):
        if records_per_shard < 1:
            raise UserError(f"records per shard must be at least 1, got {records_per_shard}")
        if paths.exists(out_dir) and not paths.isdir(out_dir):
            raise UserError(f"output {out_dir} is a file, not a folder")
        if paths.listdir(out_dir):
            if not overwrite:
                raise UserError(f"output folder {out_dir} is not empty (pass --overwrite)")
            for path in _dataset_files(out_dir):
                paths.remove(path)
        paths.makedirs(out_dir)
        self.out_dir = out_dir
        # ArrayRecord writes local files: a bucket's shards are staged here, then uploaded.
        self._staging = paths.staging_dir("sdjax-shards-") if paths.is_remote(out_dir) else None
        self._local_dir = self._staging.name if self._staging else out_dir
        self.records_per_shard = records_per_shard
        self.provenance = dict(provenance or {})
        self.shards: list[dict] = []  # {"file", "count", "bytes"} per shard so far
        self._writer = None

    def write(self, record: Record) -> None:
        self.write_encoded(record.encode())

    def write_encoded(self, data: bytes) -> None:
        """Stores bytes from `Record.encode()` (e.g. encoded in worker processes) as given."""
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None or self.shards[-1]["count"] == self.records_per_shard:
            self._finish_shard()
            name = _SHARD_PATTERN.format(len(self.shards))
            self._writer = ArrayRecordWriter(os.path.join(self._local_dir, name), _WRITER_OPTIONS)
            self.shards.append({"file": name, "count": 0, "bytes": 0})
        self._writer.write(data)
        self.shards[-1]["count"] += 1

    def _finish_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            shard = self.shards[-1]
            local = os.path.join(self._local_dir, shard["file"])
            shard["bytes"] = os.path.getsize(local)
            if self._staging is not None:
                paths.upload(local, paths.join(self.out_dir, shard["file"]))
                os.remove(local)

    def close(self) -> dict:
        """Closes the last shard and writes the manifest; returns it."""
        self._finish_shard()
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "count": sum(s["count"] for s in self.shards),
            "shards": self.shards,
            "provenance": self.provenance,
        }
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        paths.write_text(paths.join(self.out_dir, MANIFEST), text)
        self._cleanup()
        return manifest

    def _cleanup(self) -> None:
        if self._staging is not None:
            self._staging.cleanup()
            self._staging = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._finish_shard()
            self._cleanup()


def read_manifest(root: str) -> dict:
    """The manifest of a record folder; `UserError` if it is absent or unreadable."""
    path = paths.join(root, MANIFEST)
    if not paths.isdir(root):
        raise UserError(f"record folder {root} does not exist")
    try:
        manifest = json.loads(paths.read_text(path))
        version, count = manifest["schema_version"], manifest["count"]
        for shard in manifest["shards"]:
            if not {"file", "count", "bytes"} <= shard.keys():
                raise ValueError(f"shard entry {shard} needs file, count and bytes")
        shard_total = sum(shard["count"] for shard in manifest["shards"])
    except FileNotFoundError:
        raise UserError(f"{root} has no {MANIFEST} (not a record folder, or unfinished)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read {path}: {err!r}") from None
    if version != SCHEMA_VERSION:
        raise UserError(f"{path}: schema version {version}, this sdjax reads {SCHEMA_VERSION}")
    if shard_total != count:
        raise UserError(f"{path}: shard counts do not add up to the total {count}")
    return manifest


def _checked_shard(root: str, shard: dict) -> str:
    """The shard's local path (a cached copy for a bucket), after checking that it exists,
    is whole and has its records."""
    from array_record.python.array_record_module import ArrayRecordReader

    path = paths.join(root, shard["file"])
    if not paths.exists(path):
        raise UserError(f"shard {shard['file']} listed in {MANIFEST} is missing from {root}")
    size = paths.size(path)
    if size != shard["bytes"]:
        raise UserError(f"shard {path} has {size} bytes, {MANIFEST} says {shard['bytes']}")
    path = paths.local_copy(path, expected_size=size)
    try:  # a damaged footer fails on open, on counting or on closing
        reader = ArrayRecordReader(path)
        count = reader.num_records() if reader.ok() else None
        reader.close()
    except RuntimeError:
        count = None
    if count is None:
        raise UserError(f"shard {path} is unreadable (damaged ArrayRecord file)")
    if count != shard["count"]:
        raise UserError(f"shard {path} has {count} records, {MANIFEST} says {shard['count']}")
    return path


class RecordSource:
    """grain random-access source over a record folder: `source[i]` is a `Record` or None.

    None marks a damaged record (counted in `corrupt_count`, logged); drop it downstream,
    e.g. `grain.MapDataset.source(src).filter(lambda r: r is not None)`. With grain worker
    processes each worker keeps its own count.
    """

    def __init__(self, root: str):
        import grain

        self.root = root
        self.manifest = read_manifest(root)
        # "path[start:end]" spares ArrayRecord reopening every shard to count its records.
        ranges = [f"{_checked_shard(root, s)}[0:{s['count']}]" for s in self.manifest["shards"]]
        if not ranges:
            raise UserError(f"{root} holds no records")
        self._source = grain.sources.ArrayRecordDataSource(ranges)
        self._lock = threading.Lock()
        self.corrupt_count = 0

    def __len__(self) -> int:
        return self.manifest["count"]

    def __getitem__(self, index: int) -> Record | None:
        try:
            return Record.decode(self._source[index])
        except (CorruptRecord, RuntimeError) as err:  # RuntimeError: ArrayRecord hash check
            self._count_corrupt(index, err)
            return None

    def _count_corrupt(self, index: int, err: Exception) -> None:
        with self._lock:
            self.corrupt_count += 1
            count = self.corrupt_count
        if count <= _WARN_EACH:
            log.warning("%s: skipping corrupt record %d: %s", self.root, index, err)
        # Past the first few, a summary at 6, 10, 100, 1000... keeps a bad epoch's log short.
        elif count == _WARN_EACH + 1 or str(count).rstrip("0") == "1":
            log.warning("%s: %d corrupt records skipped so far", self.root, count)

    def __repr__(self) -> str:  # grain keys checkpoints on the source's repr
        return f"RecordSource({self.root!r}, count={len(self)})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
