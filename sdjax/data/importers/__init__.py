"""Importers: data people already have -> record folders, filtered and reported.

One module per source: `webdataset` (the authors' tars), `coco` (COCO instances, with or
without captions), `folder` (images with sidecar JSON). Each turns a source into records
and hands them to `common.import_records`, which applies `filters.filter_subjects`,
writes the shards and returns a `filters.FilterReport` of what was kept and dropped.
"""

from sdjax.data.importers.coco import import_coco
from sdjax.data.importers.folder import import_folder
from sdjax.data.importers.webdataset import import_webdataset

__all__ = ["import_coco", "import_folder", "import_webdataset"]
