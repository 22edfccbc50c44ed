"""Multi-host start-up: `jax.distributed.initialize` when the environment describes a cluster.

- TPU pod slices and SLURM jobs: jax detects the cluster itself.
- Any other launcher (launch/local.sh, a GPU cluster without SLURM): set
  `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID`; optionally `JAX_LOCAL_DEVICE_IDS` (comma-separated).
A single process needs none of this.
"""

from __future__ import annotations

import os

import jax


def cluster_environment() -> str | None:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        return "tpu"
    return None


def initialize() -> None:
    """Join the cluster described by the environment (no-op for a single process)."""
    kind = cluster_environment()
    if kind is None or jax.distributed.is_initialized():
        return
    if kind == "env":
        local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            local_device_ids=[int(i) for i in local.split(",")] if local else None,
        )
    else:
        jax.distributed.initialize()


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Wait until every process reaches `name` (no-op for a single process).

    Uses the coordinator's key-value barrier, not a device collective: the first
    collective of a new device group gives the other processes only 30 s (Gloo's
    rendezvous), which a process still compiling on a busy machine can miss.
    """
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def gather_json(obj) -> list:
    """Every process's JSON-serialisable `obj`, in process order (on every process)."""
    if jax.process_count() == 1:
        return [obj]
    import json

    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size]))).ravel()
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]
