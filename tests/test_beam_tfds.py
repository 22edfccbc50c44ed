"""The TFDS builder generating with Apache Beam (DirectRunner): the same examples as without."""

import pytest

pytest.importorskip("apache_beam")
tfds = pytest.importorskip("tensorflow_datasets")

from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from sdjax.data import toy  # noqa: E402
from sdjax.data.shards import ShardWriter  # noqa: E402
from sdjax.data.tfds_builder import SdjaxRecords  # noqa: E402


def test_beam_build_matches_the_plain_build(tmp_path):
    records = list(toy.generate(toy.ToyWorld(size=32), 7, seed=5, split="train"))
    with ShardWriter(str(tmp_path / "records"), records_per_shard=3) as writer:
        for record in records:
            writer.write(record)
    examples = {}
    for beam in (False, True):
        data_dir = tmp_path / f"tfds-{beam}"
        builder = SdjaxRecords(
            splits={"train": str(tmp_path / "records")}, beam=beam, data_dir=str(data_dir)
        )
        options = PipelineOptions(["--direct_num_workers=1", "--direct_running_mode=in_memory"])
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(beam_options=options) if beam else None
        )
        source = tfds.data_source("sdjax_records", split="train", data_dir=str(data_dir))
        examples[beam] = {
            source[i]["source_id"]: (source[i]["image"], source[i]["caption"])
            for i in range(len(source))
        }
    assert len(examples[True]) == 7 and examples[True] == examples[False]
