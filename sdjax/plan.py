"""`sdjax plan`: will this config fit that pod slice, and how fast will it go?

    sdjax plan --config FILE [--set k=v]... [--topology v5p:2x2x4 | --cpu-devices N]
               [--sampler [--batch N --steps N]] [--json OUT.json]      (sdjax/cli.py)

Compiles exactly the train step `sdjax train` runs (`sdjax.train.run.plan_step`, the same
code, from abstract state: no weights, no data) or, with `--sampler`, the sampler, for a
TPU topology (deviceless: libtpu compiles for chips that are not here), N CPU devices, or
the local devices. Reports per chip: memory (arguments = parameters, optimizer state and
batch; temporaries; total; the chip's capacity; headroom), FLOPs per step and per
example, collectives, and on TPU the projected step time and MFU.

Projections are the compiler's roofline (`cost_analysis()["optimal_seconds"]`: the time
at peak FLOP rate or peak memory bandwidth, whichever binds) plus the Pallas attention
kernels, which XLA's cost model does not see: their FLOPs are counted from the traced
program (`kernel_flops`) and timed at the chip's peak. Both are lower bounds on time, so
the projected MFU is an upper bound; FLOPs include rematerialisation (hardware FLOPs).
XLA's cost analysis counts a loop's body once; `xla_cost` counts it once per trip (the
sampler's denoising loop: its body compiled on its own).
Exit status 2 with one line when the step does not fit.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time

from sdjax.errors import UserError

# Chips by jax's device_kind: bf16 peak FLOP/s and HBM bytes per chip (public specs; v5p's
# HBM is what its compiler reports as available).
CHIPS = {
    "TPU v4": (275e12, 32 * 2**30),
    "TPU v5 lite": (197e12, 16 * 2**30),
    "TPU v5": (459e12, int(95.74 * 2**30)),
    "TPU v5p": (459e12, int(95.74 * 2**30)),
    "TPU v6 lite": (918e12, 32 * 2**30),
    "NVIDIA H100 80GB HBM3": (989e12, 80 * 10**9),
    "NVIDIA H200": (989e12, 141 * 10**9),
}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def target_devices(topology: str | None, cpu_devices: int | None) -> list:
    """The devices to compile for: a TPU topology's, N CPU devices, or the local ones."""
    import jax

    if topology and cpu_devices:
        raise UserError("give --topology or --cpu-devices, not both")
    if cpu_devices is not None:
        if cpu_devices < 1:
            raise UserError(f"--cpu-devices must be at least 1, got {cpu_devices}")
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", cpu_devices)
        return jax.devices()
    if not topology:
        return jax.devices()
    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)*", topology):
        raise UserError(f"--topology {topology!r}: expected e.g. v5p:2x2x4 or v5e:4x4")
    jax.config.update("jax_platforms", "cpu")  # deviceless: compile for chips not here
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as err:  # noqa: BLE001 - libtpu missing or an unknown topology
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = (
            "another process holds libtpu: run every other JAX process with JAX_PLATFORMS=cpu, "
            "or set ALLOW_MULTIPLE_LIBTPU_LOAD=1 when that one compiles for a topology too"
            if "lockfile" in first
            else "pip install sdjax[tpu]"
        )
        raise UserError(f"cannot compile for TPU {topology} ({first}); {hint}") from None


def chip(device) -> tuple[float | None, int | None]:
    """(peak bf16 FLOP/s, memory bytes) of a device; None where unknown (CPU: no peak,
    memory = this machine's RAM shared by its devices)."""
    if device.platform == "cpu":
        import jax

        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return None, ram // len(jax.devices("cpu"))
    peak, memory = CHIPS.get(device.device_kind, (None, None))
    with contextlib.suppress(Exception):  # topology devices have no stats
        memory = device.memory_stats()["bytes_limit"]
    return peak, memory


def kernel_flops(jaxpr) -> float:
    """FLOPs of the Pallas attention kernels in a traced program (per device: inside
    shard_map the shapes are per shard), which XLA's cost analysis counts as none.

    Per kernel call on q `[.., T, dqk]`, k `[.., S, dqk]`, v `[.., S, dv]` (leading dims
    multiplied): forward 2TS(dqk + dv); dq 2TS(2 dqk + dv); dkv 2TS(2 dqk + 2 dv), the
    matmuls each pass recomputes or computes. Loops count once per trip (scan length).
    """
    import math as m

    total = 0.0
    for eqn, trips in _eqns(jaxpr, 1):
        if eqn.primitive.name != "pallas_call":
            continue
        arrays = [v.aval for v in eqn.invars if getattr(v.aval, "ndim", 0) >= 3]
        floats = [a for a in arrays if "float" in str(a.dtype)]
        if len(floats) < 3:
            continue
        q, k, v = floats[:3]
        t, s, dqk, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
        lead = m.prod(q.shape[:-2])
        name = str(eqn.params.get("name_and_src_info", eqn.params.get("name", "")))
        per = {"dkv": 2 * dqk + 2 * dv, "dq": 2 * dqk + dv}
        width = next((w for key, w in per.items() if f"_{key}" in name), dqk + dv)
        total += trips * 2.0 * lead * t * s * width
    return total


def matmul_flops(jaxpr) -> float:
    """FLOPs of the matmuls and convolutions in a traced program, 2 per multiply-add by
    their shapes (the program's global shapes; per shard inside shard_map). Loops count
    once per trip; a Pallas kernel's insides are `kernel_flops`'s. It does not depend on
    how XLA partitions or loops the program, so it checks XLA's count."""
    import math as m

    total = 0.0
    for eqn, trips in _eqns(jaxpr, 1):
        name, out = eqn.primitive.name, eqn.outvars[0].aval if eqn.outvars else None
        if name == "dot_general":  # out [..] = sum over contracted dims of lhs
            (contracted, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += trips * 2.0 * m.prod(out.shape) * m.prod(lhs[i] for i in contracted)
        elif name == "conv_general_dilated":  # each output: window x input features/group
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
            window = m.prod(rhs[i] for i in spec[2:]) * rhs[spec[1]]
            total += trips * 2.0 * m.prod(out.shape) * window
    return total


def _subjaxprs(eqn):
    from jax.extend.core import ClosedJaxpr, Jaxpr

    for value in eqn.params.values():
        for sub in value if isinstance(value, list | tuple) else (value,):
            if isinstance(sub, ClosedJaxpr):
                yield sub.jaxpr
            elif isinstance(sub, Jaxpr):
                yield sub


def _loops(jaxpr):
    """The outermost loops of a program, however deep in calls: (body ClosedJaxpr, trips).
    A Pallas kernel's insides are its own."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn.params["jaxpr"], eqn.params["length"]
        elif eqn.primitive.name != "pallas_call":
            for sub in _subjaxprs(eqn):
                yield from _loops(sub)


def _counted(known: set[int], has_while: bool, trips: int) -> int:
    """How often XLA's cost analysis counts a loop of `trips` trips, given the trip counts
    the compiler annotated on the program's while loops (XLA:CPU does, XLA:TPU does not)
    and whether it has any: once per trip of the annotated while loop it became (`trips`
    over any unrolling), once when while loops are there unannotated, every trip when it
    was unrolled whole."""
    kept = [n for n in known if n > 1 and trips % n == 0]
    if kept:
        return trips // max(kept)
    return 1 if has_while else trips


def xla_cost(compiled, jaxpr, device, log=print) -> tuple[dict, list]:
    """XLA's cost analysis of `compiled` (traced as `jaxpr`) -> ({flops, optimal_seconds,
    bytes}, loops), each loop body counted once per trip: a body XLA counted fewer times
    is compiled alone on `device` and its cost added (loops: [{trips, flops_per_trip}])."""
    import jax
    from jax.extend.core import jaxpr_as_fun

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    keys = {"flops": "flops", "optimal_seconds": "optimal_seconds", "bytes": "bytes accessed"}
    total = {k: float(cost.get(name, 0.0)) for k, name in keys.items()}
    loops, bodies = [], list(_loops(jaxpr))
    hlo = compiled.as_text() if bodies else ""
    known = {int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"', hlo)}
    has_while = re.search(r"\swhile\(", hlo) is not None
    for body, trips in bodies:
        missing = trips - _counted(known, has_while, trips)
        if missing <= 0:
            continue
        where = jax.sharding.SingleDeviceSharding(device)
        args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where) for a in body.in_avals]
        start = time.perf_counter()
        traced = jax.jit(jaxpr_as_fun(body)).trace(*args)
        inner = traced.lower().compile()
        log(f"loop body ({trips} trips) compiled in {time.perf_counter() - start:.1f} s")
        per_trip, _ = xla_cost(inner, traced.jaxpr.jaxpr, device, log)
        for k in total:
            total[k] += missing * per_trip[k]
        loops.append({"trips": trips, "flops_per_trip": per_trip["flops"]})
    return total, loops


def _eqns(jaxpr, trips):
    """Every equation of a jaxpr and its sub-jaxprs (not a Pallas kernel's), with how
    often it runs."""
    for eqn in jaxpr.eqns:
        yield eqn, trips
        if eqn.primitive.name == "pallas_call":  # its insides run per block
            continue
        inner = trips * (eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1)
        for sub in _subjaxprs(eqn):
            yield from _eqns(sub, inner)


def analyse(lowered, jitted_trace, examples: int, devices: list, log=print) -> dict:
    """Compile and read the compiler's memory and cost analyses (per device) into the
    report's fields; a step the chip's memory refuses is reported, not raised."""
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as err:  # noqa: BLE001 - XLA's RESOURCE_EXHAUSTED and kin
        text = str(err)
        if "RESOURCE_EXHAUSTED" not in text and "exceeds" not in text:
            raise
        return {"fits": False, "compile_error": text.strip().splitlines()[0][:500]}
    seconds = time.perf_counter() - start
    log(f"compiled in {seconds:.1f} s")
    memory = compiled.memory_analysis()
    cost, loops = xla_cost(compiled, jitted_trace.jaxpr.jaxpr, devices[0], log)
    peak, capacity = chip(devices[0])
    arguments = int(memory.argument_size_in_bytes)
    temps = int(memory.temp_size_in_bytes)
    outputs = int(memory.output_size_in_bytes - memory.alias_size_in_bytes)
    total = arguments + temps + outputs + int(memory.generated_code_size_in_bytes)
    kernels = kernel_flops(jitted_trace.jaxpr.jaxpr)
    flops = cost["flops"] + kernels
    hlo = compiled.as_text()
    report = {
        "fits": capacity is None or total <= capacity,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "compile_seconds": round(seconds, 1),
        "hbm_per_chip_bytes": total,
        "hbm_capacity_bytes": capacity,
        "headroom": None if capacity is None else round(1.0 - total / capacity, 4),
        "arguments_bytes": arguments,
        "temporaries_bytes": temps,
        "outputs_bytes": outputs,
        "flops_per_step": flops * len(devices),
        "flops_per_chip": flops,
        "kernel_flops_per_chip": kernels,
        "examples_per_step": examples,
        "flops_per_example": flops * len(devices) / examples,
        "matmul_flops_per_example": matmul_flops(jitted_trace.jaxpr.jaxpr) / examples,
        "bytes_accessed_per_chip": cost["bytes"],
        "loops": loops,
        "collectives": {c: len(re.findall(rf"\b{c}(-start)?\(", hlo)) for c in _COLLECTIVES},
        "windowed_loops": len(re.findall(r"\swhile\(.*body=%[\w.]*windowed_dot_general", hlo)),
    }
    if report["windowed_loops"]:
        log(
            f"warning: {report['windowed_loops']} collective-matmul loops, each counted once "
            "by XLA's cost analysis: the FLOPs and times below are too low"
        )
    if devices[0].platform == "tpu" and peak:
        xla_seconds = cost["optimal_seconds"]
        step = xla_seconds + kernels / peak
        report.update(
            optimal_seconds=step,
            xla_optimal_seconds=xla_seconds,
            peak_flops_per_chip=peak,
            examples_per_second=examples / step,
            projected_mfu=round(flops / (step * peak), 4),
        )
    return report


def plan_training(config, devices, log=print) -> dict:
    """The train step of `config` compiled for `devices` (module doc)."""
    import flax.linen as nn
    import jax

    from sdjax.models.kernels import compiling_for, resolve
    from sdjax.parallel.mesh import make_mesh
    from sdjax.parallel.sharding import as_rules
    from sdjax.train.run import plan_step
    from sdjax.train.tasks import task_for

    if "attention" in config.model:
        config.model.attention = resolve(config.model.attention, devices[0].platform)
    mesh = make_mesh(config.mesh.to_dict(), devices)
    rules = as_rules(config.sharding_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), compiling_for(devices[0].platform):
        task = task_for(config)
        plan = plan_step(config, task, mesh, rules)
        start = time.perf_counter()
        traced = plan.step.trace(plan.abstract_state, plan.batch)
        lowered = traced.lower()
        log(f"traced and lowered in {time.perf_counter() - start:.1f} s")
        report = analyse(lowered, traced, config.train.batch_size, devices, log)
    leaves = jax.tree.leaves(plan.abstract_state.trainable)
    report["params_trainable"] = sum(math.prod(x.shape) for x in leaves)
    report["params_total"] = sum(math.prod(x.shape) for x in jax.tree.leaves(task.boxed))
    report["mesh"] = dict(mesh.shape)
    return report


def plan_sampler(config, devices, batch: int, steps: int, log=print) -> dict:
    """The sampler (`sdjax.sampling.generate`: batch images, `steps` DDIM steps, three
    guidance branches) for the model of `config`, as `sdjax.sample` runs it on `devices`'
    platform (bfloat16 off CPU), with abstract parameters replicated on each device."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from sdjax.models.kernels import compiling_for, resolve
    from sdjax.models.layers import unbox
    from sdjax.sampling import bfloat16_model, sampler, split_devices
    from sdjax.subject_diffusion import abstract_params
    from sdjax.train.tasks.subject_diffusion import model_config

    platform = devices[0].platform
    config.model.attention = resolve(config.model.get("attention", "auto"), platform)
    model, _ = model_config(config)
    if platform != "cpu":
        model = bfloat16_model(model)
    used = split_devices(batch, devices)
    mesh = Mesh(np.asarray(used), ("batch",))
    whole, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16

    def struct(x, sharding, cast=False):
        floating = cast and jnp.issubdtype(x.dtype, jnp.floating)
        return jax.ShapeDtypeStruct(x.shape, dtype if floating else x.dtype, sharding=sharding)

    params = jax.tree.map(lambda x: struct(x, whole, True), unbox(abstract_params(model)))
    inputs = {k: struct(v, split) for k, v in sampler_inputs(model, batch).items()}
    rng = struct(jax.eval_shape(lambda: jax.random.key(0)), whole)
    scalars = [jax.ShapeDtypeStruct((), t, sharding=whole) for t in (jnp.float32,) * 2]
    scalars.append(jax.ShapeDtypeStruct((), jnp.int32, sharding=whole))
    start = time.perf_counter()
    with compiling_for(platform):
        traced = sampler(platform).trace(model, steps, used, params, inputs, rng, *scalars)
        lowered = traced.lower()
    log(f"traced and lowered in {time.perf_counter() - start:.1f} s")
    report = analyse(lowered, traced, batch, list(used), log)
    report["params_total"] = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    report["steps"] = steps
    return report


def sampler_inputs(model, batch: int) -> dict:
    """ShapeDtypeStructs of `sdjax.sampling.prepare_inputs`' arrays for a batch."""
    import jax
    import jax.numpy as jnp

    n, s, h = model.max_subjects, model.image.image_size, model.latent_size
    length, i32 = model.text.max_position_embeddings, jnp.int32
    shapes = {
        "ids": ((length,), i32),
        "plain_ids": ((length,), i32),
        "empty_ids": ((length,), i32),
        "placeholders": ((n,), i32),
        "label_positions": ((n,), i32),
        "valid": ((n,), bool),
        "use_box": ((n,), bool),
        "refs": ((n, s, s, 3), jnp.float32),
        "boxes": ((n, 4), jnp.float32),
        "regions": ((n, h, h), jnp.float32),
    }
    return {k: jax.ShapeDtypeStruct((batch, *shape), t) for k, (shape, t) in shapes.items()}


def _gib(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _flops(n: float) -> str:
    return f"{n / 1e12:.2f} T" if n >= 1e11 else f"{n / 1e9:.3f} G"


def memory_line(r: dict) -> str:
    return f"{_gib(r['hbm_per_chip_bytes'])} per chip, capacity {_gib(r['hbm_capacity_bytes'])}"


def summary(r: dict) -> str:
    """The report as a few human lines."""
    what = "sampler" if r["sampler"] else "train step"
    lines = [f"{what} of {r['config']} on {r['devices']} x {r['device_kind']}"]
    if "compile_error" in r:
        return "\n".join([*lines, f"  does not fit: {r['compile_error']}"])
    headroom = "-" if r["headroom"] is None else f"{100 * r['headroom']:.1f}%"
    lines += [
        f"  memory per chip: arguments {_gib(r['arguments_bytes'])}, temporaries "
        f"{_gib(r['temporaries_bytes'])}, total {_gib(r['hbm_per_chip_bytes'])} of "
        f"{_gib(r['hbm_capacity_bytes'])} (headroom {headroom})",
        f"  FLOPs: {_flops(r['flops_per_step'])} per step, {_flops(r['flops_per_example'])} "
        f"per example ({_flops(r['kernel_flops_per_chip'])} per chip in attention kernels; "
        f"by their shapes, matmuls and convolutions {_flops(r['matmul_flops_per_example'])} "
        "per example)",
        "  collectives: " + ", ".join(f"{k} {v}" for k, v in r["collectives"].items()),
    ]
    if "params_trainable" in r:
        lines.append(f"  parameters: {r['params_total']:,} ({r['params_trainable']:,} trained)")
    if "projected_mfu" in r:
        lines.append(
            f"  projected (roofline): {r['optimal_seconds']:.3f} s per step, "
            f"{r['examples_per_second']:.1f} examples/s, MFU {100 * r['projected_mfu']:.1f}%"
        )
    return "\n".join(lines)
