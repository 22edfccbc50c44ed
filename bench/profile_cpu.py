"""Where one toy UNet call spends its time on CPU: a jax.profiler trace, summed per op kind.

The UNet of configs/toy.py (random weights) on the sampler's per-step batch (`--batch`,
default 12: 4 images x 3 guidance branches), jitted, warmed up, then `--calls` calls under
`jax.profiler.trace`. Each XLA kernel in the trace is matched with its instruction in the
compiled HLO and filed under a kind (convolution, dot, reduction, elementwise: what the
fusion contains), and the script prints milliseconds per call per kind and the slowest
kernels. Run it pinned to one core (`taskset -c 0`) for a per-kernel picture free of
threading effects.

    python bench/profile_cpu.py [--batch 12] [--calls 10] [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile

import numpy as np

OP = re.compile(r"(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(")
SKIP = {"parameter", "constant", "broadcast", "bitcast", "reshape", "tuple", "get-tuple-element"}


def hlo_kinds(hlo: str) -> dict[str, str]:
    """instruction name -> kind, from the text of a compiled HLO module."""
    bodies, current = {}, None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            current = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            bodies[current.lstrip("%")] = []
        elif current and (m := OP.match(line.strip())):
            bodies[current.lstrip("%")].append((m.group(1), m.group(2), line))
    kinds = {}
    for ops in bodies.values():
        for name, op, line in ops:
            if op != "fusion":
                kinds[name] = op
                continue
            called = re.search(r"calls=%?([\w.\-]+)", line)
            inner = {o for _, o, _ in bodies.get(called.group(1), [])} - SKIP if called else set()
            for kind in ("convolution", "dot", "reduce"):
                if kind in inner:
                    kinds[name] = f"fusion with {kind}"
                    break
            else:
                kinds[name] = "elementwise fusion"
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from common import random_params
    from sample_cpu import model_config

    from sdjax.subject_diffusion import abstract_params, modules

    config, _ = model_config([])
    params = random_params(abstract_params(config))["unet"]
    unet, b, size = modules(config)["unet"], args.batch, config.latent_size
    rng = np.random.default_rng(0)
    inputs = (
        rng.standard_normal((b, size, size, config.unet.in_channels), np.float32),
        np.full((b,), 500, np.int32),
        rng.standard_normal((b, config.text.max_position_embeddings, 64), np.float32),
        rng.standard_normal((b, config.max_subjects * 16, config.unet.objs_dim), np.float32),
    )
    call = jax.jit(lambda p, *x: unet.apply({"params": p}, *x))
    inputs = [jnp.asarray(x) for x in inputs]
    for _ in range(3):
        call(params, *inputs).block_until_ready()
    kinds = hlo_kinds(call.lower(params, *inputs).compile().as_text())
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(args.calls):
                call(params, *inputs).block_until_ready()
        trace = jax.profiler.ProfileData.from_file(
            glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0]
        )
        per_kernel = collections.Counter()
        for plane in trace.planes:
            for line in plane.lines:
                for event in line.events:
                    if event.name in kinds:
                        per_kernel[event.name] += event.duration_ns / 1e6 / args.calls
    per_kind = collections.Counter()
    for name, ms in per_kernel.items():
        per_kind[kinds[name]] += ms
    print(f"toy UNet, batch {b}: {sum(per_kernel.values()):.1f} ms of kernels per call")
    for kind, ms in per_kind.most_common():
        print(f"  {ms:8.2f} ms  {kind}")
    print(f"slowest {args.top} kernels:")
    for name, ms in per_kernel.most_common(args.top):
        print(f"  {ms:8.2f} ms  {name} ({kinds[name]})")


if __name__ == "__main__":
    main()
