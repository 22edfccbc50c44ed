"""The SDD curation pipeline (docs/method.md §5): image, caption, nouns, boxes, masks, record.

- `stages.py`: the steps, one function each, and the batch they run on (shared);
- `sources.py`: input in the importers' formats (image folders, webdataset tars, COCO),
  local or `gs://`, cut into numbered blocks;
- `output.py`: one shard per block, written whole, then report and manifest;
- `local.py`: the single-process runner (resumable block by block);
- `beam.py`: the same stages as an Apache Beam pipeline, the models through RunInference
  (DirectRunner on local cores, or Dataflow / Flink / Spark);
- `models.py`: transformers' BLIP-2, Grounding DINO and SAM as the model steps (torch).

Both runners write the same shards from the same input: same names, same bytes.
"""

from sdjax.data.curation.local import curate, curate_units
from sdjax.data.curation.stages import (
    CurationConfig,
    Detections,
    Stages,
    curate_image,
    stored_image,
)

__all__ = [
    "CurationConfig",
    "Detections",
    "Stages",
    "curate",
    "curate_image",
    "curate_units",
    "stored_image",
]
