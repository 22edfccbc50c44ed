"""`sdjax plan`: the exact train step and sampler compiled for a TPU topology without a TPU
(libtpu from the test extra), the report's fields, and the one-line errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_config import ROOT

from sdjax.cli import main
from sdjax.errors import UserError
from sdjax.plan import analyse, kernel_flops, matmul_flops, target_devices

TINY = f"{ROOT}/tests/train_config.py"
FIELDS = {
    "fits",
    "hbm_per_chip_bytes",
    "hbm_capacity_bytes",
    "flops_per_step",
    "examples_per_step",
    "params_total",
    "params_trainable",
    "optimal_seconds",
    "projected_mfu",
}


@pytest.fixture(scope="module")
def tpu():
    pytest.importorskip("libtpu", reason="the test extra brings libtpu (jax[tpu])")
    return target_devices("v5p:2x2x1", None)


def test_train_step_compiles_for_a_tpu_topology(tpu, tmp_path, capsys):
    out = str(tmp_path / "plan.json")
    argv = ["plan", "--config", TINY, "--topology", "v5p:2x2x1", "--json", out]
    argv += ["--set", "mesh.data=4", "--set", "model.resolution=16"]
    assert main(argv) == 0
    with open(out) as f:
        report = json.load(f)
    assert set(report) >= FIELDS and report["fits"] and report["devices"] == 4
    assert report["device_kind"].startswith("TPU v5")
    assert 0 < report["hbm_per_chip_bytes"] < report["hbm_capacity_bytes"]
    assert report["examples_per_step"] == 8 and report["params_trainable"] < report["params_total"]
    # The UNet's 256-token self-attention runs in splash kernels, counted by hand.
    assert 0 < report["kernel_flops_per_chip"] < report["flops_per_chip"]
    assert 0 < report["projected_mfu"] < 1 and report["collectives"]["all-reduce"] > 0
    assert report["windowed_loops"] == 0
    # XLA's count has the matmuls and the elementwise work besides (a third of it at this
    # tiny width; at SD 2-base's the two counts are within 1%).
    xla = (report["flops_per_chip"] - report["kernel_flops_per_chip"]) * report["devices"]
    assert 0.5 < report["matmul_flops_per_example"] * 8 / xla < 1.0
    assert "projected (roofline)" in capsys.readouterr().out


@pytest.mark.parametrize("collective_matmul", [False, True])
def test_collective_matmul_loops_are_off_on_tpu_unless_asked(tpu, collective_matmul):
    """XLA:TPU would loop an fsdp-split weight's matmul over its shards (here, on 16
    chips), a loop its cost analysis counts once; the train step turns that off, and
    `analyse` warns of it."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    from ml_collections import ConfigDict

    from sdjax.train.run import compiler_options

    train = ConfigDict(dict(collective_matmul=collective_matmul))
    assert compiler_options(train, jax.devices("cpu")[0]) is None
    chips = target_devices("v5p:2x2x4", None)
    mesh = Mesh(np.asarray(chips), ("fsdp",))
    x = jax.ShapeDtypeStruct((16, 512, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
    split = NamedSharding(mesh, P(None, "fsdp"))  # the weight's columns over the chips
    w = jax.ShapeDtypeStruct((256, 1024), jnp.bfloat16, sharding=split)
    with jax.set_mesh(mesh):  # as the train step is planned
        options = compiler_options(train, chips[0])
    assert (options is None) == collective_matmul
    matmul = jax.jit(
        lambda x, w: x @ w, out_shardings=NamedSharding(mesh, P("fsdp")), compiler_options=options
    )
    traced = matmul.trace(x, w)
    logged = []
    report = analyse(traced.lower(), traced, 16, chips, log=logged.append)
    assert (report["windowed_loops"] > 0) == collective_matmul
    assert any("collective-matmul loops" in line for line in logged) == collective_matmul
    per_chip = 2 * 16 * 512 * 256 * 1024 / len(chips)
    assert (report["flops_per_chip"] == pytest.approx(per_chip, rel=0.02)) != collective_matmul


def test_a_step_the_chip_cannot_hold_is_reported_not_raised(tpu):
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(jax.sharding.Mesh(np.asarray(tpu[:1]), ("x",)), PartitionSpec())
    big = jax.ShapeDtypeStruct((2**17, 2**17), jnp.float32, sharding=sharding)  # 64 GiB
    traced = jax.jit(lambda a: jnp.sin(a) * 2.0).trace(big)  # + a 64 GiB result
    report = analyse(traced.lower(), traced, 1, tpu[:1], log=lambda _: None)
    assert report["fits"] is False  # a v5p chip holds 95.74 GiB


def test_kernel_flops_counts_splash_calls_and_loop_trips(tpu):
    from sdjax.models.kernels import attend

    q = jnp.zeros((1, 128, 2, 8))

    def once(q):
        return attend(q, q, q, scale=1.0, implementation="splash")

    def looped(q):
        return jax.lax.scan(lambda c, _: (once(c), None), q, None, length=3)[0]

    per_call = 2.0 * 2 * 128 * 128 * (8 + 8)  # heads * T * S * (dqk + dv), times 2
    assert kernel_flops(jax.make_jaxpr(once)(q).jaxpr) == per_call
    assert kernel_flops(jax.make_jaxpr(looped)(q).jaxpr) == 3 * per_call


def test_matmul_flops_counts_dots_and_convolutions_by_shape_and_loop_trips():
    x, w = jnp.zeros((2, 5, 8)), jnp.zeros((8, 3))
    image, kernel = jnp.zeros((2, 6, 6, 4)), jnp.zeros((3, 3, 2, 4))  # 2 groups of 2 in

    def once(x, image):
        conv = jax.lax.conv_general_dilated(
            image,
            kernel,
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=2,
        )
        return x @ w, conv

    def looped(x, image):
        return jax.lax.scan(lambda c, _: (c, once(x, image)), 0.0, None, length=3)[1]

    per_call = 2.0 * 2 * 5 * 3 * 8 + 2.0 * (2 * 6 * 6 * 4) * (3 * 3 * 2)
    assert matmul_flops(jax.make_jaxpr(once)(x, image).jaxpr) == per_call
    assert matmul_flops(jax.make_jaxpr(looped)(x, image).jaxpr) == 3 * per_call
    # A gradient's program has the forward matmul and, for x's gradient, one more.
    grad = jax.grad(lambda x: (x @ w).sum())
    assert matmul_flops(jax.make_jaxpr(grad)(x).jaxpr) == 2 * (2.0 * 2 * 5 * 3 * 8)


def test_splash_lowers_to_its_tpu_kernel_when_compiling_for_tpu(tpu):
    from sdjax.models.kernels import attend, compiling_for

    where = jax.sharding.SingleDeviceSharding(tpu[0])
    q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16, sharding=where)

    def lowered():
        splash = jax.jit(lambda q: attend(q, q, q, scale=1.0, implementation="splash"))
        return splash.trace(q).lower()

    with compiling_for("tpu"):
        kernel = lowered().as_text()
    assert "tpu_custom_call" in kernel and "while" not in kernel
    # Without it this CPU host interprets the kernel as XLA loops (what the tests run).
    assert "tpu_custom_call" not in lowered().as_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--topology", "v5p:2y2"], "expected e.g. v5p:2x2x4"),
        (["--sampler", "--batch", "0"], "--batch and --steps must be at least 1"),
        (["--json", "/nonexistent/dir/p.json"], "output folder does not exist"),
        (["--devices", "99"], "--devices must be in 1.."),
    ],
)
def test_bad_input_is_one_line(argv, message, capsys):
    assert main(["plan", "--config", TINY, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_topology_and_cpu_devices_exclude_each_other():
    with pytest.raises(UserError, match="not both"):
        target_devices("v5p:2x2x1", 2)


@pytest.mark.parametrize("target", ["cpu", "tpu"])
def test_the_sampler_counts_every_denoising_step(target, request, tmp_path):
    """XLA's cost analysis counts a loop's body once; the plan counts it once per step,
    whether the compiler annotates the loop's trip count (XLA:CPU) or not (XLA:TPU)."""
    where = ["--topology", "v5p:2x2x1"] if target == "tpu" else []
    if target == "tpu":
        request.getfixturevalue("tpu")  # skipped without libtpu
    reports = {}
    for steps in (1, 3):
        out = tmp_path / f"steps{steps}.json"
        argv = ["plan", "--config", TINY, "--sampler", *where, "--devices", "1", "--batch", "2"]
        assert main([*argv, "--steps", str(steps), "--json", str(out)]) == 0
        reports[steps] = json.loads(out.read_text())
    assert reports[1]["loops"] == []  # one trip: no loop left to undercount
    (loop,) = reports[3]["loops"]
    assert loop["trips"] == 3 and loop["flops_per_trip"] > 0
    xla = {n: r["flops_per_step"] - r.get("kernel_flops_per_chip", 0.0) for n, r in reports.items()}
    assert xla[3] - xla[1] == pytest.approx(2 * loop["flops_per_trip"], rel=0.05)  # 1 device
