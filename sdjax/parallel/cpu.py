"""One JAX device per CPU core, so the sampler splits a batch across the cores.

XLA's CPU backend runs each operation on a pool of threads, which gains nothing on the
small operations of a toy-size UNet: on 2 cores, 4 images take 4.0 s as one device with
two threads and 2.6 s as two devices side by side (BENCHMARKS.md, "Performance work").
`sdjax.sampling.generate` splits its batch over the CPU devices there are; the CLI's
sampling commands (sample, demo, eval) call `use_cpu_cores()` first. From Python, call it
right after `import jax`, or set `jax.config.update("jax_num_cpu_devices", n)` yourself.
"""

from __future__ import annotations

import os

import jax


def use_cpu_cores() -> int | None:
    """Give the CPU backend one device per core this process may run on; returns that
    count, or None where the count is already chosen (XLA_FLAGS' forced device count,
    `jax_num_cpu_devices`) or JAX has already started its backends."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    if jax.config.jax_num_cpu_devices != -1:
        return None
    cores = len(os.sched_getaffinity(0))
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except RuntimeError:  # backends already initialised: keep what they have
        return None
    return cores
