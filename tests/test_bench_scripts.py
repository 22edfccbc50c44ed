"""The benchmark scripts' helpers (bench/common.py, bench/gpu.py): the worker protocol and
its interleaving, random weights, the synthetic training batch against the loader's
contract, and the GPU benchmark's model and tables. The benchmarks themselves are run by
hand (`--quick` validates them end to end)."""

import json
import os
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import common  # noqa: E402
import gpu  # noqa: E402

WORKER = """
import os, sys
sys.path.insert(0, {bench!r})
from common import serve

class Handler:
    def run(self, repeat):
        with open({log!r}, "a") as f:
            f.write(f"{{sys.argv[2]}} {{repeat}}\\n")
        print("noise on stdout")  # must not reach the protocol
        return {{"pid": os.getpid()}}

    def boom(self):
        raise ValueError("planted failure")

serve(Handler())
"""


def test_workers_interleave_and_report_errors(tmp_path):
    log = tmp_path / "order.log"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(bench=os.path.join(ROOT, "bench"), log=str(log)))
    with common.Worker(str(script), "a") as a, common.Worker(str(script), "b") as b:
        replies = common.interleave({"a": a, "b": b}, 3)
        with pytest.raises(RuntimeError, match="planted failure"):
            a.call("boom")
        assert a.call("run", repeat=9)["pid"] == a.proc.pid  # still serving after an error
    assert log.read_text().split("\n")[:6] == ["a 0", "b 0", "b 1", "a 1", "a 2", "b 2"]
    assert [len(r) for r in replies.values()] == [3, 3]


def test_random_params_are_scaled_by_fan_in():
    abstract = {
        "conv": {
            "kernel": jax.ShapeDtypeStruct((3, 3, 64, 128), np.float32),
            "bias": jax.ShapeDtypeStruct((128,), np.float32),
        },
        "norm": {"scale": jax.ShapeDtypeStruct((128,), np.float32)},
        "null_feature": jax.ShapeDtypeStruct((16, 32), np.float32),
    }
    params = common.random_params(abstract, seed=1)
    assert params["conv"]["kernel"].dtype == np.float32
    assert params["conv"]["kernel"].std() == pytest.approx(1 / np.sqrt(3 * 3 * 64), rel=0.05)
    assert not params["conv"]["bias"].any() and (params["norm"]["scale"] == 1).all()
    assert params["null_feature"].std() == pytest.approx(0.02, rel=0.2)


def test_synthetic_batch_meets_the_loader_contract():
    from tiny import tiny_config

    from sdjax.train.tasks.subject_diffusion import batch_spec

    model = tiny_config()
    batch = common.synthetic_batch(model, 3)
    for key, spec in batch_spec(model, 3).items():
        assert batch[key].shape == spec.shape and batch[key].dtype == spec.dtype, key
    assert batch["valid"][:, 0].all()
    assert batch["loc"].shape == (3, model.latent_size, model.latent_size, 1)
    inside = batch["masks"].sum(axis=(-1, -2))
    assert (inside > 0).all()  # every box covers some mask cells


def test_gpu_model_and_tables():
    from gpu_parts import model_config, plain

    quick = model_config(True, "cudnn")
    assert quick.attention == "xla" and quick.unet.dtype == "float32"
    full = model_config(False, "cudnn")
    assert full.unet.block_out_channels == (320, 640, 1280, 1280)
    assert full.unet.dtype == "bfloat16" and full.unet.remat
    assert full.attention == "cudnn" and full.latent_size == 64
    assert not plain(full).unet.remat and plain(full).attention == "xla"
    assert gpu.peak_bf16("NVIDIA H100 80GB HBM3", None) == 989e12
    assert gpu.peak_bf16("Some GPU", None) is None
    sdjax_batch = {
        "images_per_s": 2.0,
        "seconds": [0.5],
        "compile": {"total": 30.0, "compile": 25.0},
        "recompiles_on_new_prompt": 0,
    }
    results = {
        "sample-sdjax": {"batches": {"1": sdjax_batch}, "peak_memory_gib": 9.5},
        "sample-torch": {"skipped": "diffusers is not importable"},
    }
    _, headers, rows = gpu.sample_table(results)
    assert rows[0][:6] == ["1", "2", "0.5", "n/a", "n/a", "n/a"]
    assert rows[-1][0] == "torch: diffusers is not importable"
    assert len(rows[0]) == len(headers)
    assert gpu.train_table(None, None)[2] == [["not run"] + [""] * 8]
    json.dumps(results)  # the payload stays JSON


def test_ablation_table_marks_each_row_against_the_full_method(tmp_path):
    import toy_ablations

    full = dict.fromkeys(toy_ablations.METRICS, 0.5)
    worse = {**full, "colour": 0.4, "swap": 0.6, "leak": 0.4}
    text = toy_ablations.table({"full": full, "no_adapter": worse})
    row = next(line for line in text.splitlines() if line.startswith("| no_adapter"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    columns = dict(zip(["row", *toy_ablations.METRICS, "paper"], cells))
    assert columns["colour"] == "0.400 (-)" and columns["swap"] == "0.600 (-)"
    assert columns["leak"] == "0.400 (+)" and columns["shape"] == "0.500"
    assert columns["paper"] == "-0.177 / -0.095"
    by_kind = {
        kind: {"model": {"colour": c, "clip_i": 0.2, "iou": 0.5}}
        for kind, c in zip(
            [k for kinds in toy_ablations.SUBJECT_KINDS.values() for k in kinds], [1, 0.5, 0, 0.25]
        )
    }
    split = toy_ablations.subject_split(by_kind)
    assert split["colour"] == [0.75, 0.125] and split["iou"] == [0.5, 0.5]
    assert "| full | 0.750 / 0.125 | 0.200 / 0.200 | 0.500 / 0.500 |" in (
        toy_ablations.split_table({"full": split})
    )
    with pytest.raises(SystemExit):
        toy_ablations.main(
            [
                "--data",
                "d",
                "--image-encoder",
                "e",
                "--root",
                str(tmp_path),
                "--rows",
                "full,no_such_row",
            ]
        )
