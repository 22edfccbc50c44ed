"""gs:// run folders against a real GCS API server on loopback (tests/gcs_emulator.py).

Checkpoints, metrics, config, TensorBoard, record folders and exports go to the bucket;
nothing lands in a local `gs:` folder. The slow test is the acceptance check: a 2-process
run with a gs:// workdir, killed with SIGKILL, resumed with 1 process, repeats the losses of
an uninterrupted run.
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from gcs_emulator import BUCKET, emulator, emulator_env, environ

from sdjax import paths
from sdjax.config import load_config
from sdjax.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(HERE, "train_config.py")


@pytest.fixture(scope="module")
def gcs():
    """The emulator's URL, with the two variables a user sets pointing at it."""
    with emulator() as url, environ(emulator_env(url)):
        yield url


def bucket_path(*parts) -> str:
    return "/".join([f"gs://{BUCKET}", uuid.uuid4().hex[:8], *parts])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from sdjax.data.generate import write_toy_dataset

    path = str(tmp_path_factory.mktemp("toy16"))
    write_toy_dataset(path, 64, size=32, workers=1, overwrite=True)
    return path


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in paths.read_text(f"{workdir}/metrics.jsonl").splitlines()]


def test_paths_round_trip_on_the_emulator(gcs, tmp_path):
    root = bucket_path("files")
    paths.makedirs(root)
    paths.write_text(f"{root}/a.json", '{"a": 1}')
    paths.write_text(f"{root}/a.json", '{"a": 2}')  # replaced whole
    paths.write_bytes(f"{root}/sub/b.bin", b"\x00\x01")
    assert paths.read_text(f"{root}/a.json") == '{"a": 2}'
    assert paths.listdir(root) == ["a.json", "sub"]
    assert paths.exists(f"{root}/sub/b.bin") and not paths.exists(f"{root}/missing")
    assert paths.size(f"{root}/sub/b.bin") == 2
    local = paths.local_copy(f"{root}/sub/b.bin", expected_size=2)
    assert pathlib.Path(local).read_bytes() == b"\x00\x01"
    (tmp_path / "up.txt").write_text("up")
    paths.upload(str(tmp_path / "up.txt"), f"{root}/up.txt")
    paths.download_tree(root, str(tmp_path / "down"))
    assert (tmp_path / "down" / "up.txt").read_text() == "up"
    assert (tmp_path / "down" / "sub" / "b.bin").read_bytes() == b"\x00\x01"


def test_emulator_switches(gcs, monkeypatch):
    # Only STORAGE_EMULATOR_HOST set: tensorstore (orbax's arrays) follows it.
    monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL")
    paths.configure_gcs()
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == gcs
    # Two servers would split a checkpoint: refused.
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://127.0.0.1:1")
    with pytest.raises(UserError, match="same storage server"):
        paths.resolve(f"gs://{BUCKET}/x")


def test_record_folder_in_a_bucket_reads_like_a_local_one(gcs, data_dir):
    from sdjax.data.generate import write_toy_dataset
    from sdjax.data.shards import RecordSource, read_manifest

    remote = bucket_path("data")
    write_toy_dataset(remote, 64, size=32, workers=1, records_per_shard=40, overwrite=True)
    assert sorted(paths.listdir(remote)) == [
        "manifest.json",
        "shard-00000.array_record",
        "shard-00001.array_record",
    ]
    assert read_manifest(remote)["count"] == 64
    here, there = RecordSource(data_dir), RecordSource(remote)
    assert [here[i] for i in (0, 39, 40, 63)] == [there[i] for i in (0, 39, 40, 63)]
    # overwrite replaces the dataset's files (and only those)
    paths.write_text(f"{remote}/notes.txt", "keep")
    write_toy_dataset(remote, 8, size=32, workers=1, overwrite=True)
    assert sorted(paths.listdir(remote)) == [
        "manifest.json",
        "notes.txt",
        "shard-00000.array_record",
    ]


RUN = ["train.num_steps=6", "train.log_every=2"]  # checkpoints at 4 and 6 (train_config)


@pytest.fixture(scope="module")
def gs_run(gcs, data_dir, tmp_path_factory):
    """A 6-step run in a bucket, started from another folder; also counts the metrics
    dicts fetched from the devices (jax.device_get, the real one, counted)."""
    import jax

    from sdjax.train.loop import train

    workdir = bucket_path("run")
    cwd = tmp_path_factory.mktemp("cwd")
    here, real_get, fetched = os.getcwd(), jax.device_get, []

    def counting_get(x):
        if isinstance(x, dict) and "loss" in x:
            fetched.append(x)
        return real_get(x)

    os.chdir(cwd)
    jax.device_get = counting_get
    try:
        train(load_config(CONFIG, [f"data.path={data_dir}", *RUN]), workdir)
    finally:
        jax.device_get = real_get
        os.chdir(here)
    return workdir, cwd, len(fetched)


def test_training_writes_its_run_folder_to_the_bucket(gs_run):
    workdir, cwd, _ = gs_run
    assert os.listdir(cwd) == []  # not <cwd>/gs:/bucket/run
    assert sorted(paths.listdir(workdir)) == [
        "checkpoints",
        "config.json",
        "metrics.jsonl",
        "tensorboard",
    ]
    assert [r["step"] for r in metrics(workdir)] == [2, 4, 6]
    assert json.loads(paths.read_text(f"{workdir}/config.json"))["train"]["num_steps"] == 6
    steps = paths.listdir(f"{workdir}/checkpoints")
    assert {"4", "6"} <= set(steps)
    assert paths.exists(f"{workdir}/checkpoints/6/commit_success.txt")
    assert any(n.startswith("events.out.tfevents") for n in paths.listdir(f"{workdir}/tensorboard"))


def test_resume_from_the_bucket_repeats_the_lost_steps(gs_run, data_dir):
    from sdjax.train.loop import train

    workdir, _, _ = gs_run
    before = metrics(workdir)
    # As if killed after step 6 was logged but before its checkpoint was committed.
    paths.resolve(f"{workdir}/checkpoints/6/commit_success.txt").unlink()
    train(load_config(CONFIG, [f"data.path={data_dir}", *RUN]), workdir)
    after = metrics(workdir)
    assert [r["step"] for r in after] == [2, 4, 6]
    assert [r["loss"] for r in after] == [r["loss"] for r in before]


def test_metrics_stay_on_device_between_logging_steps(gs_run):
    _, _, fetched = gs_run
    assert fetched == 3  # steps 2, 4 and 6 of 6


def test_export_reads_and_writes_buckets(gs_run, tmp_path):
    from sdjax.cli import main
    from sdjax.pipeline import load_pipeline

    workdir, _, _ = gs_run
    out = bucket_path("export")
    assert main(["export", workdir, out, "--format", "sdjax"]) == 0
    paths.download_tree(out, str(tmp_path / "pipe"))
    exported = load_pipeline(str(tmp_path / "pipe"))
    assert exported.config.resolution == 16
    assert main(["export", workdir, out, "--format", "sdjax"]) == 2  # not empty


# The acceptance check: 2 processes into a bucket, SIGKILL, resume with 1 process.


def _train_cmd(workdir, data_dir, steps, *sets):
    return [
        sys.executable,
        "-m",
        "sdjax",
        "train",
        "--config",
        CONFIG,
        "--workdir",
        workdir,
        "--set",
        f"data.path={data_dir}",
        "--set",
        f"train.num_steps={steps}",
        *[a for s in sets for a in ("--set", s)],
    ]


FAST_COMPILE = "--xla_backend_optimization_level=0"  # as tests/conftest.py, for every run
ONE_PROCESS = f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"


def _env(gcs_url, **extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(emulator_env(gcs_url), XLA_FLAGS=FAST_COMPILE)
    env.setdefault(
        "JAX_COMPILATION_CACHE_DIR",
        os.environ.get("SDJAX_TEST_JAX_CACHE", os.path.join("/tmp", "sdjax-jax-cache")),
    )
    env.update(extra)
    return env


@pytest.mark.slow
def test_two_processes_killed_then_one_process_resumes_in_a_bucket(gcs, data_dir, tmp_path):
    steps = 12
    sets = ("mesh.data=2", "mesh.fsdp=4", "train.checkpoint_every=4")
    # Uninterrupted reference: one process, 8 devices, a local folder.
    reference = str(tmp_path / "reference")
    subprocess.run(
        _train_cmd(reference, data_dir, steps, *sets),
        env=_env(gcs, XLA_FLAGS=ONE_PROCESS),
        check=True,
        capture_output=True,
        timeout=1200,
    )
    ref = [r["loss"] for r in metrics(reference)]

    workdir = bucket_path("killed")
    launcher = subprocess.Popen(
        [os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "-d", "4", "--"]
        + _train_cmd(workdir, data_dir, steps, *sets),
        env=_env(gcs),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = f"{workdir}/checkpoints/4/commit_success.txt"
    deadline = time.time() + 1200
    while not paths.exists(marker):
        assert launcher.poll() is None, "the 2-process run exited before its first checkpoint"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.5)
    time.sleep(random.uniform(0.0, 2.0))  # anywhere in the next checkpoint interval
    # SIGKILL both training processes (each leads its own process group) and the launcher,
    # as when the machines are lost.
    ranks = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(launcher.pid)], capture_output=True, text=True
    ).stdout.split()
    for pid in ranks:
        if os.getpgid(int(pid)) == int(pid):
            os.killpg(int(pid), signal.SIGKILL)
    launcher.kill()
    launcher.wait()
    done = [r["step"] for r in metrics(workdir)]
    assert done[-1] < steps, "the run finished before it could be killed"

    subprocess.run(
        _train_cmd(workdir, data_dir, steps, *sets),
        env=_env(gcs, XLA_FLAGS=ONE_PROCESS),
        check=True,
        capture_output=True,
        timeout=1200,
    )
    rows = metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # Sharded over 2 processes vs 1: the same examples, summed in another order.
    got = np.array([r["loss"] for r in rows])
    worst = float(np.max(np.abs(got - ref) / np.abs(ref)))
    print(
        f"killed after step {done[-1]}; resumed losses vs uninterrupted: max rel. diff {worst:.1e}"
    )
    np.testing.assert_allclose(got, ref, rtol=2e-4)
