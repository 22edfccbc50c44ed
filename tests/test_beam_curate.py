"""Curation on Apache Beam (DirectRunner): the same shards as the single-process runner,
from image lists, webdataset tars and folders, with stand-in stages and with tiny random
BLIP-2 / Grounding DINO / SAM; a killed job's rerun; sources; the Beam metrics."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("apache_beam")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_curate import CONFIG, ITEMS, FakeStages  # noqa: E402
from test_curation_models import tiny_models  # noqa: E402

from sdjax.cli import main  # noqa: E402
from sdjax.data.curation import beam, local, output, sources  # noqa: E402
from sdjax.data.curation.output import WORK  # noqa: E402
from sdjax.data.curation.stages import StageClock  # noqa: E402
from sdjax.data.records import Record  # noqa: E402
from sdjax.data.shards import MANIFEST, RecordSource  # noqa: E402
from sdjax.errors import UserError  # noqa: E402

IN_PROCESS = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


def _files(folder) -> dict[str, bytes]:
    """Every file of an output folder by name (shards, report, manifest)."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _steps(fake: FakeStages) -> beam.ModelSteps:
    return beam.ModelSteps(
        captioner=lambda: fake.captioner,
        detector=lambda: fake.detector,
        segmenter=lambda: fake.segmenter,
    )


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_beam_writes_the_single_process_shards(tmp_path):
    units = sources.listing_units(ITEMS, CONFIG.chunk_size)
    described = sources.items_description(ITEMS)
    expected = local.curate(ITEMS, FakeStages().stages(), str(tmp_path / "local"), CONFIG)
    clock = StageClock()
    report = beam.curate_units(
        units, described, _steps(FakeStages()), str(tmp_path / "beam"), CONFIG, IN_PROCESS,
        clock=clock,
    )  # fmt: skip
    assert report == expected
    assert _files(tmp_path / "beam") == _files(tmp_path / "local")  # byte for byte
    # the metrics: every image read and loaded; 10 readable and large enough captioned
    assert clock.images["read"] == clock.images["load"] == clock.images["write"] == 14
    assert clock.images["caption"] == 10 and clock.images["segment"] == 8
    assert all(seconds > 0 for seconds in clock.seconds.values())


def test_beam_metrics_hold_the_report_counts(tmp_path):
    """The job's `sdjax.curate` counters: report.json's counts, dropped ones by reason."""
    import apache_beam
    from apache_beam.metrics.metric import MetricsFilter

    units = sources.listing_units(ITEMS, CONFIG.chunk_size)
    described = sources.items_description(ITEMS)
    out = str(tmp_path / "out")
    done = output.prepare(out, local.plan(CONFIG, described), overwrite=False)
    pipeline = apache_beam.Pipeline(options=beam.pipeline_options(IN_PROCESS))
    beam.build(pipeline, units, _steps(FakeStages()), CONFIG, out, done, {})
    result = pipeline.run()
    result.wait_until_finish()
    metrics = result.metrics().query(MetricsFilter().with_namespace(beam.NAMESPACE))
    counts = {
        c.key.metric.name: c.result
        for c in metrics["counters"]
        if not c.key.metric.name.endswith(".images")  # the per-step counts
    }
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    expected = {name: report[name] for name in ("images_seen", "images_kept", "subjects_kept")}
    for kind in ("dropped_images", "dropped_subjects"):
        expected |= {f"{kind}.{reason}": n for reason, n in report[kind].items()}
    assert counts == expected
    assert counts["images_seen"] == 14 and counts["dropped_subjects.area_ratio"] == 8


def test_webdataset_tars_cut_into_blocks(tmp_path):
    # two tars; the first holds 6 samples (blocks of 4: two blocks), one without an image
    samples = [(f"{i:03d}", data) for i, (_, data) in enumerate(ITEMS)]
    first = [(f"{k}.png", d) for k, d in samples[:6]] + [
        (f"{k}.txt", b"alt " + k.encode()) for k, _ in samples[:1]
    ]
    _tar(tmp_path / "a.tar", sorted(first) + [("006.txt", b"no image")])
    _tar(tmp_path / "b.tar", [(f"{k}.png", d) for k, d in samples[6:]])
    units, described = sources.input_units([str(tmp_path / "*.tar")], 4)
    assert described["format"] == "webdataset" and [u.number for u in units] == [0, 1]
    raws = [r for u in units for r in sources.read_unit(u, 4)]
    assert [(r.block, r.position) for r in raws[:8]] == [
        ((0, 0), 0), ((0, 0), 1), ((0, 0), 2), ((0, 0), 3), ((0, 1), 0), ((0, 1), 1),
        ((0, 1), 2), ((1, 0), 0),
    ]  # fmt: skip
    assert raws[0].source_id == "a.tar/000" and raws[0].attributes == {
        "original_caption": "alt 000"
    }
    assert raws[6].data is None  # 006 has no image
    out = {}
    for runner in ("local", "beam"):
        out[runner] = tmp_path / runner
        if runner == "local":
            local.curate_units(units, described, FakeStages().stages(), str(out[runner]), CONFIG)
        else:
            beam.curate_units(
                units, described, _steps(FakeStages()), str(out[runner]), CONFIG, IN_PROCESS
            )
    assert _files(out["beam"]) == _files(out["local"])
    names = [s["file"] for s in json.loads((out["beam"] / MANIFEST).read_text())["shards"]]
    # block (0, 1) keeps nothing (a small image, a one-subject one, no image): no shard
    assert names == [
        "shard-00000-00000.array_record", "shard-00001-00000.array_record",
        "shard-00001-00001.array_record",
    ]  # fmt: skip
    first_record = RecordSource(str(out["beam"]))[0]
    assert first_record.attributes["original_caption"] == "alt 000"


def test_sources_folder_and_coco(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / ".hidden").mkdir()
    for name in ("b.png", "a.jpg", "sub/c.png", ".hidden/d.png", "notes.txt"):
        (images / name).write_bytes(b"x")
    units, described = sources.input_units([str(images)], 2)
    assert described["format"] == "folder"
    assert [[sid for sid, _ in u.files] for u in units] == [["a.jpg", "b.png"], ["sub/c.png"]]
    coco = tmp_path / "instances.json"
    coco.write_text(
        json.dumps({"images": [{"id": 2, "file_name": "b.png"}, {"id": 1, "file_name": "a.jpg"}]})
    )
    units, described = sources.input_units([str(images)], 5, instances=str(coco))
    assert described["format"] == "coco"
    assert [sid for sid, _ in units[0].files] == ["coco/a.jpg", "coco/b.png"]
    (images / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        sources.input_units([str(images / "empty")], 2)
    with pytest.raises(UserError, match="no tars match"):
        sources.input_units([str(tmp_path / "*.tar")], 2)


def _scene_files(folder, n: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (48 + i % 3 * 8, 64, 3), dtype=np.uint8)
        pixels[8:30, 10 + i : 40 + i] = (200, 40, 40)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Tiny random models, 13 images, and the single-process CLI's output."""
    root = tmp_path_factory.mktemp("beam_tiny")
    models = tiny_models(root / "models", varied=True)
    _scene_files(root / "images", 12)
    args = [
        "data", "curate", str(root / "images"), "--chunk-size", "2", "--batch-size", "2",
        "--min-short-side", "32", "--no-filter", "--device", "cpu",
        *[f"--{role}={path}" for role, path in models.items()],
    ]  # fmt: skip
    assert main([*args, "--out", str(root / "local")]) == 0
    return root, args


def test_beam_with_tiny_models_equals_single_process(tiny_run):
    root, args = tiny_run
    assert main([*args, "--out", str(root / "beam"), "--beam", *IN_PROCESS]) == 0
    assert _files(root / "beam") == _files(root / "local")
    report = json.loads((root / "local" / "report.json").read_text())
    # every stage had work: captions with nouns, detections, masks, kept records
    assert report["images_seen"] == 13 and report["dropped_images"]["unreadable"] == 1
    assert report["images_kept"] >= 2 and report["subjects_kept"] >= 4
    source = RecordSource(str(root / "beam"))
    record = source[0]
    assert isinstance(record, Record) and len(record.subjects) >= 2 and record.caption


def _kill_at_first_block(command: list[str], out) -> int:
    """Starts the job, SIGKILLs it once its first block is written; the blocks written then."""
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    blocks = out / WORK / "blocks"
    deadline = time.monotonic() + 300
    while not (blocks.is_dir() and any(n.endswith(".json") for n in os.listdir(blocks))):
        assert job.poll() is None, f"the job ended before it was killed: {job.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    job.send_signal(signal.SIGKILL)
    job.wait()
    job.stderr.close()
    return sum(n.endswith(".json") for n in os.listdir(blocks))


def _check_killed(out, reference) -> None:
    """No manifest; every shard under its final name whole (equal to the finished one's)."""
    assert not (out / MANIFEST).exists() and not (out / "report.json").exists()
    for name in os.listdir(out):
        if name.startswith("shard-"):
            assert (out / name).read_bytes() == (reference / name).read_bytes()


KILLED_JOB = """
import dataclasses, sys
sys.path.insert(0, {tests!r})
from test_curate import CONFIG, ITEMS, FakeStages
from sdjax.data.curation import beam, sources
fake = FakeStages()
steps = beam.ModelSteps(lambda: fake.captioner, lambda: fake.detector, lambda: fake.segmenter)
config = dataclasses.replace(CONFIG, chunk_size=1)
beam.curate_units(sources.listing_units(ITEMS, 1), sources.items_description(ITEMS), steps,
                  {out!r}, config, {options!r})
"""


def test_killed_beam_job_reruns_to_the_same_shards(tmp_path):
    config = CONFIG.__class__(**{**CONFIG.__dict__, "chunk_size": 1})  # 14 blocks
    local.curate(ITEMS, FakeStages().stages(), str(tmp_path / "local"), config)
    out = tmp_path / "out"
    tests = os.path.dirname(os.path.abspath(__file__))
    script = KILLED_JOB.format(tests=tests, out=str(out), options=IN_PROCESS)
    written = _kill_at_first_block([sys.executable, "-c", script], out)
    assert 1 <= written <= 14
    _check_killed(out, tmp_path / "local")
    # the rerun (the same job) skips the written blocks, writes the rest, lists whole shards
    units = sources.listing_units(ITEMS, 1)
    rerun = FakeStages()
    beam.curate_units(
        units, sources.items_description(ITEMS), _steps(rerun), str(out), config, IN_PROCESS
    )
    assert _files(out) == _files(tmp_path / "local")
    print(f"killed with {written} of 14 blocks written")


@pytest.mark.slow
def test_killed_cli_beam_job_reruns_to_the_same_shards(tiny_run, tmp_path):
    """The same through `sdjax data curate --beam` with the tiny models, rerun by the CLI."""
    root, args = tiny_run
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sdjax", *args, "--out", str(out), "--beam", *IN_PROCESS]
    _kill_at_first_block(command, out)
    _check_killed(out, root / "local")
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert _files(out) == _files(root / "local")


def test_beam_reads_and_writes_a_bucket(tmp_path):
    """Images in a gs:// folder to shards in a gs:// folder (a GCS API server on loopback)."""
    from gcs_emulator import BUCKET, emulator, emulator_env, environ

    from sdjax import paths

    local_in = tmp_path / "images"
    for name, data in ITEMS:
        (local_in / name).parent.mkdir(parents=True, exist_ok=True)
        (local_in / name).write_bytes(data)
    units, described = sources.input_units([str(local_in)], CONFIG.chunk_size)
    local.curate_units(units, described, FakeStages().stages(), str(tmp_path / "local"), CONFIG)
    with emulator() as url, environ(emulator_env(url)):
        for name, data in ITEMS:
            paths.write_bytes(f"gs://{BUCKET}/in/{name}", data)
        units, described = sources.input_units([f"gs://{BUCKET}/in"], CONFIG.chunk_size)
        out = f"gs://{BUCKET}/out"
        beam.curate_units(units, described, _steps(FakeStages()), out, CONFIG, IN_PROCESS)
        names = paths.listdir(out)
        remote = {name: paths.read_bytes(paths.join(out, name)) for name in names}
    expected = _files(tmp_path / "local")
    assert names == sorted(expected)  # no work folder or staging files left behind
    for name in names:
        if name == MANIFEST:  # the same but for where the input came from
            a, b = json.loads(remote[name]), json.loads(expected[name])
            assert a["provenance"]["input"]["sources"] == [f"gs://{BUCKET}/in"]
            for manifest in (a, b):
                del manifest["provenance"]["input"]["sources"]
            assert a == b
        else:
            assert remote[name] == expected[name], name
