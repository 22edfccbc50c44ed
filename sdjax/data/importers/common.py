"""What every importer shares: filter each record, write it, count what was dropped.

A source yields `(record, reasons)` per image, the shape `filters.filter_subjects`
returns: a record (or None when the image could not be used) and one reason per subject
it could not build, a dropped image's reason last.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from sdjax import __version__
from sdjax.data.filters import FilterConfig, FilterReport, filter_subjects
from sdjax.data.records import Record
from sdjax.data.shards import ShardWriter

Sample = tuple[Record | None, list[str]]


def import_records(
    samples: Iterable[Sample],
    out_dir: str,
    *,
    filters: FilterConfig | None,
    provenance: dict,
    records_per_shard: int = 1000,
    overwrite: bool = False,
    total: int | None = None,
) -> FilterReport:
    """Filters (unless `filters` is None) and writes the samples' records into `out_dir`.

    The manifest's provenance gets the filter settings and the report.
    """
    from tqdm import tqdm

    report = FilterReport()
    provenance = {
        **provenance,
        "sdjax_version": __version__,
        "filters": None if filters is None else dataclasses.asdict(filters),
    }
    with (
        ShardWriter(out_dir, records_per_shard, provenance, overwrite) as writer,
        tqdm(total=total, unit="image", desc=provenance["generator"], disable=None) as bar,
    ):
        for record, reasons in samples:
            if record is not None and filters is not None:
                record, dropped = filter_subjects(record, filters)
                reasons = reasons + dropped
            report.add(record, reasons)
            if record is not None:
                writer.write(record)
            bar.update()
        writer.provenance["report"] = report.as_dict()
    return report
