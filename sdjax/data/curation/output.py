"""Curation output: one shard per block, written whole or not at all, then the manifest.

    OUT/shard-UUUUU-KKKKK.array_record   the records of block (U, K), in input order
    OUT/report.json                      what was kept and dropped (`FilterReport`)
    OUT/manifest.json                    written last (`shards.py`'s format)
    OUT/.curate/plan.json                while unfinished: the settings and input it is for
    OUT/.curate/blocks/UUUUU-KKKKK.json  while unfinished: a finished block's shard entry
                                         and report, written after its shard

A shard is written under a temporary name (local: in `.curate/tmp`, then renamed into
place; `gs://`: staged locally and uploaded, a GCS object appearing whole), so a name
`shard-*.array_record` is only ever a complete shard. Writing a block is idempotent: its
content depends on the input alone, so a retried or rerun block writes the same bytes. A
rerun of an unfinished curation (the same plan) skips the blocks whose report exists and
whose shard is whole (of the reported size). The manifest lists only shards of block
reports, each checked for its size before it is listed; then `.curate` is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable

from sdjax import __version__, paths
from sdjax.data.curation.sources import block_name
from sdjax.data.curation.stages import Outcome
from sdjax.data.filters import FilterReport
from sdjax.data.records import SCHEMA_VERSION
from sdjax.data.shards import _WRITER_OPTIONS, MANIFEST
from sdjax.errors import UserError

WORK = ".curate"
PLAN = "plan.json"
REPORT = "report.json"
_BLOCKS = "blocks"


def shard_name(block: tuple[int, int]) -> str:
    return f"shard-{block_name(block)}.array_record"


def prepare(out_dir: str, plan: dict, overwrite: bool) -> dict[tuple[int, int], dict]:
    """Makes the work folder, or keeps an unfinished run's with the same plan; returns the
    finished blocks' results (`write_block`'s dicts) by block."""
    work = paths.join(out_dir, WORK)
    if paths.isdir(work) and not overwrite:
        try:
            previous = json.loads(paths.read_text(paths.join(work, PLAN)))
        except FileNotFoundError:
            previous = None
        if previous is not None:
            if previous != plan:
                raise UserError(
                    f"{out_dir} holds an unfinished curation of other input or settings: "
                    f"rerun its command, or pass --overwrite ({_difference(previous, plan)})"
                )
            return _finished_blocks(out_dir)
    if paths.exists(out_dir) and not paths.isdir(out_dir):
        raise UserError(f"output {out_dir} is a file, not a folder")
    if paths.listdir(out_dir):
        if not overwrite:
            raise UserError(f"output folder {out_dir} is not empty (pass --overwrite)")
        _clear(out_dir)
    paths.makedirs(paths.join(work, _BLOCKS))
    paths.write_text(paths.join(work, PLAN), json.dumps(plan, indent=2, sort_keys=True) + "\n")
    return {}


def _difference(previous: dict, plan: dict) -> str:
    keys = sorted(k for k in {*previous, *plan} if previous.get(k) != plan.get(k))
    return "differs in " + ", ".join(keys)


def _clear(out_dir: str) -> None:
    """Removes a previous curation's files (shards, manifest, report, work folder) only."""
    for name in paths.listdir(out_dir):
        path = paths.join(out_dir, name)
        if name == WORK:
            _remove_tree(path)
        elif name in (MANIFEST, REPORT) or (
            name.startswith("shard-") and name.endswith(".array_record")
        ):
            paths.remove(path)


def _remove_tree(path: str) -> None:
    if paths.is_remote(path):
        paths.resolve(path).rmtree(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _finished_blocks(out_dir: str) -> dict[tuple[int, int], dict]:
    """The blocks whose report exists and whose shard (if any) is whole: a block whose shard
    went missing or was damaged since is not finished, and the rerun writes it again."""
    folder = paths.join(out_dir, WORK, _BLOCKS)
    names = [n for n in paths.listdir(folder) if n.endswith(".json") and not n.startswith(".")]
    results = [json.loads(data) for data in _read_all([paths.join(folder, n) for n in names])]
    sizes = _sizes(out_dir)
    return {
        tuple(result["block"]): result
        for result in results
        if result["shard"] is None or sizes.get(result["shard"]["file"]) == result["shard"]["bytes"]
    }


def _gcs():
    import fsspec

    paths.configure_gcs()
    return fsspec.filesystem("gs")


def _read_all(files: list[str]) -> list[bytes]:
    """The files' contents; a bucket's fetched concurrently (a resumed run may have
    hundreds of thousands of block reports)."""
    if files and paths.is_remote(files[0]):
        fetched = _gcs().cat(files)
        return [fetched[f.removeprefix("gs://")] for f in files]
    return [paths.read_bytes(f) for f in files]


def _sizes(folder: str) -> dict[str, int]:
    """Size by file name of a folder's files, in one listing."""
    if paths.is_remote(folder):
        listed = _gcs().ls(folder, detail=True)
        return {e["name"].rsplit("/", 1)[-1]: e["size"] for e in listed if e["type"] == "file"}
    return {e.name: e.stat().st_size for e in os.scandir(folder) if e.is_file()}


def write_block(out_dir: str, block: tuple[int, int], outcomes: Iterable[Outcome]) -> dict:
    """Writes a block's records (in input order) as its shard, then its report; returns
    {"block", "shard": {"file", "count", "bytes"} or None (no record kept), "report"}."""
    outcomes = sorted(outcomes, key=lambda o: o.position)
    report = FilterReport()
    for outcome in outcomes:
        report.add(_Kept(outcome.subjects) if outcome.record else None, list(outcome.reasons))
    records = [o.record for o in outcomes if o.record is not None]
    shard = _write_shard(out_dir, shard_name(block), records) if records else None
    result = {"block": list(block), "shard": shard, "report": report.as_dict()}
    name = f"{block_name(block)}.json"
    paths.write_text(paths.join(out_dir, WORK, _BLOCKS, name), json.dumps(result, sort_keys=True))
    return result


class _Kept:
    """What `FilterReport.add` reads of a kept record: its subjects' count."""

    def __init__(self, count: int):
        self.subjects = range(count)


def _write_shard(out_dir: str, name: str, records: list[bytes]) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    remote = paths.is_remote(out_dir)
    staging = paths.staging_dir("sdjax-curate-") if remote else None
    folder = staging.name if remote else paths.join(out_dir, WORK, "tmp")
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{name}.{uuid.uuid4().hex}.part")
    try:
        writer = ArrayRecordWriter(tmp, _WRITER_OPTIONS)
        for record in records:
            writer.write(record)
        writer.close()
        size = os.path.getsize(tmp)
        if remote:
            paths.upload(tmp, paths.join(out_dir, name))
        else:
            os.replace(tmp, paths.join(out_dir, name))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if staging is not None:
            staging.cleanup()
    return {"file": name, "count": len(records), "bytes": size}


def finish(out_dir: str, results: Iterable[dict], provenance: dict) -> FilterReport:
    """Writes report.json and then the manifest from every block's result; removes the work
    folder. Every listed shard is checked for its size first."""
    results = sorted(results, key=lambda r: tuple(r["block"]))
    report = FilterReport()
    for result in results:
        report.merge(FilterReport.from_dict(result["report"]))
    shards = [r["shard"] for r in results if r["shard"] is not None]
    sizes = _sizes(out_dir)
    for shard in shards:
        if sizes.get(shard["file"]) != shard["bytes"]:
            path = paths.join(out_dir, shard["file"])
            raise UserError(f"shard {path} is missing or not whole: rerun the same command")
    text = json.dumps(report.as_dict(), indent=2, sort_keys=True) + "\n"
    paths.write_text(paths.join(out_dir, REPORT), text)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "count": sum(s["count"] for s in shards),
        "shards": shards,
        "provenance": {
            **provenance,
            "generator": "curate",
            "sdjax_version": __version__,
            "report": report.as_dict(),
        },
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    paths.write_text(paths.join(out_dir, MANIFEST), text)
    _remove_tree(paths.join(out_dir, WORK))
    return report
