"""Training: the losses, frozen parameters, sharded = single-device, exact resume after
kill -9 (also into another mesh), SIGTERM, divergence, and the multi-process launcher."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.checkpoint import restore_params
from sdjax.config import load_config
from sdjax.data.generate import write_toy_dataset
from sdjax.train.loop import TrainingDiverged, train
from sdjax.train.losses import attention_map_loss

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(HERE, "train_config.py")
STEPS = 24  # the reference run's length


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("toy16"))
    write_toy_dataset(path, 64, size=32, workers=1, overwrite=True)
    return path


def metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(rows, first=1, last=None) -> list[float]:
    return [r["loss"] for r in rows if r["step"] >= first and (last is None or r["step"] <= last)]


def run(workdir, data_dir, *sets):
    train(load_config(CONFIG, [f"data.path={data_dir}", *sets]), str(workdir))
    return metrics(workdir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """One device, uninterrupted."""
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, run(workdir, data_dir, f"train.num_steps={STEPS}")


def command(workdir, data_dir, *sets):
    return [
        sys.executable,
        "-m",
        "sdjax",
        "train",
        "--config",
        CONFIG,
        "--workdir",
        str(workdir),
        "--set",
        f"data.path={data_dir}",
        *[a for s in sets for a in ("--set", s)],
    ]


def subprocess_env():
    # Share the tests' compilation cache, and let the process see the 8 CPU devices.
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": os.environ.get(
            "SDJAX_TEST_JAX_CACHE", os.path.join("/tmp", "sdjax-jax-cache")
        ),
    }


def wait_for_checkpoint(workdir, step, proc, timeout=600):
    marker = os.path.join(workdir, "checkpoints", str(step), "commit_success.txt")
    start = time.time()
    while not os.path.exists(marker):
        assert proc.poll() is None, "training exited before its first checkpoint"
        assert time.time() - start < timeout, "no checkpoint in time"
        time.sleep(0.05)


def test_attention_map_loss_by_hand():
    # One 2x2 layer, one subject (mask: the top-left pixel), its placeholder and label
    # token; the second slot is empty and must not count.
    probs = np.zeros((1, 4, 4), np.float32)
    probs[0, :, 0] = [0.4, 0.2, 0.2, 0.2]  # placeholder of slot 0
    probs[0, :, 2] = [0.1, 0.5, 0.3, 0.1]  # label of slot 0
    probs[0, :, 1] = probs[0, :, 3] = 0.9  # slot 1 (invalid)
    masks = np.zeros((1, 2, 2, 2), np.float32)
    masks[0, 0, 0, 0] = 1.0
    valid = np.array([[True, False]])
    # balanced L1 per token: mean outside - mean inside
    expected = ((0.6 / 3 - 0.4) + (0.9 / 3 - 0.1)) / 2
    got = attention_map_loss([jnp.asarray(probs)], masks, valid, "balanced_l1")
    assert float(got) == pytest.approx(expected, abs=1e-6)
    # L1: mean |A - M| per token
    expected = ((0.6 + 0.6) / 4 + (0.9 + 0.9) / 4) / 2
    assert float(attention_map_loss([jnp.asarray(probs)], masks, valid, "l1")) == pytest.approx(
        expected, abs=1e-6
    )


def test_training_learns_and_leaves_frozen_parameters_untouched(reference):
    workdir, rows = reference
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) and "attn" in r and "mse" in r for r in rows)
    assert np.mean(losses(rows, STEPS - 4)) < np.mean(losses(rows, 1, 4))
    # The image encoder is frozen (configs/toy.py): bitwise equal across checkpoints,
    # while the trained parts move.
    _, early = restore_params(os.path.join(workdir, "checkpoints", str(STEPS - 4)))
    _, late = restore_params(os.path.join(workdir, "checkpoints", str(STEPS)))
    frozen = [k for k in late if k.startswith("image_encoder/")]
    assert frozen and all(np.array_equal(early[k], late[k]) for k in frozen)
    assert not np.array_equal(early["unet/conv_in/kernel"], late["unet/conv_in/kernel"])


def test_sharded_mesh_matches_one_device_and_restores_into_another(reference, data_dir, tmp_path):
    _, ref = reference
    horizon = f"train.schedule_steps={STEPS}"  # stop part-way along the reference's schedule
    sharded = run(tmp_path, data_dir, "mesh.data=2", "mesh.fsdp=4", "train.num_steps=4", horizon)
    np.testing.assert_allclose(losses(sharded), losses(ref, 1, 4), rtol=2e-4)
    resumed = run(tmp_path, data_dir, "mesh.data=1", "mesh.fsdp=1", "train.num_steps=6", horizon)
    np.testing.assert_allclose(losses(resumed, 5), losses(ref, 5, 6), rtol=2e-4)


def test_kill_9_then_rerun_repeats_the_uninterrupted_run(reference, data_dir, tmp_path):
    _, ref = reference
    cmd = command(tmp_path, data_dir, f"train.num_steps={STEPS}")
    proc = subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_checkpoint(tmp_path, 4, proc)
    time.sleep(random.uniform(0.0, 1.0))
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    subprocess.run(cmd, env=subprocess_env(), check=True, capture_output=True)
    assert losses(metrics(tmp_path)) == losses(ref)


def test_sigterm_saves_the_step_in_flight_and_exits_75(data_dir, tmp_path):
    proc = subprocess.Popen(
        command(tmp_path, data_dir, "train.num_steps=100000"),
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_checkpoint(tmp_path, 4, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 75  # EX_TEMPFAIL: launchers requeue / rerun
    last = metrics(tmp_path)[-1]["step"]
    saved = max(int(d) for d in os.listdir(os.path.join(tmp_path, "checkpoints")) if d.isdigit())
    assert saved == last > 4


def test_divergence_stops_naming_the_step_without_saving_it(data_dir, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"at step (\d+)") as err:
        run(
            tmp_path,
            data_dir,
            "train.lr=1e30",
            "train.warmup_steps=1",
            "train.clip_norm=0.0",
            "train.num_steps=50",
        )
    step = int(err.value.args[0].split("at step ")[1].split(";")[0])
    saved = [int(d) for d in os.listdir(os.path.join(tmp_path, "checkpoints")) if d.isdigit()]
    assert all(s < step for s in saved)


@pytest.mark.slow
def test_two_processes_reproduce_the_single_process_losses(reference, data_dir, tmp_path):
    _, ref = reference
    cmd = [
        os.path.join(ROOT, "launch", "local.sh"),
        "-n",
        "2",
        "-d",
        "4",
        "--",
        *command(
            tmp_path,
            data_dir,
            "mesh.data=2",
            "mesh.fsdp=4",
            "train.num_steps=10",
            f"train.schedule_steps={STEPS}",
        ),
    ]
    env = {k: v for k, v in subprocess_env().items() if k != "XLA_FLAGS"}
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
    np.testing.assert_allclose(losses(metrics(tmp_path)), losses(ref, 1, 10), rtol=2e-4)


def test_export_writes_pipelines_of_ema_or_raw_weights_and_diffusers_folders(reference, tmp_path):
    from sdjax.cli import main
    from sdjax.pipeline import load_pipeline

    workdir, _ = reference
    latest = os.path.join(workdir, "checkpoints", str(STEPS))
    for name, extra in (("ema", []), ("raw", ["--raw-weights"])):
        assert (
            main(["export", str(workdir), str(tmp_path / name), "--format", "sdjax", *extra]) == 0
        )
    ema, raw = (load_pipeline(str(tmp_path / n)) for n in ("ema", "raw"))
    _, trained = restore_params(latest, use_ema=False)
    kernel = "unet/conv_in/kernel"
    np.testing.assert_array_equal(raw.params["unet"]["conv_in"]["kernel"], trained[kernel])
    assert not np.array_equal(ema.params["unet"]["conv_in"]["kernel"], trained[kernel])
    assert ema.config == raw.config == load_pipeline(str(workdir)).config
    assert main(["export", str(workdir), str(tmp_path / "torch")]) == 0
    assert os.path.isfile(tmp_path / "torch" / "unet" / "config.json")
    assert main(["export", str(workdir), str(tmp_path / "torch")]) == 2  # not empty
