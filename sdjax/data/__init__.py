"""Data: the record schema, record folders (ArrayRecord shards + manifest), the toy world.

Every source writes `Record`s (`records.py`) into a record folder with `ShardWriter` and
every consumer reads them back with `RecordSource` (`shards.py`), a grain data source.
"""

from sdjax.data.records import SCHEMA_VERSION, CorruptRecord, Record, Subject
from sdjax.data.shards import RecordSource, ShardWriter

__all__ = ["SCHEMA_VERSION", "CorruptRecord", "Record", "RecordSource", "ShardWriter", "Subject"]
