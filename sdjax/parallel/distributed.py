"""Multi-host start-up, and stopping every process at the same step when one is preempted.

Start-up (`initialize`) follows JAX's own cluster detection, in JAX's order:
- explicit: `JAX_COORDINATOR_ADDRESS` (host:port of process 0) with `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID` (launch/local.sh, any launcher of your own);
- Open MPI (`mpirun`), SLURM (`srun`: SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS,
  SLURM_PROCID, SLURM_LOCALID; one process per GPU unless `JAX_LOCAL_DEVICE_IDS` lists a
  node's GPUs), GKE TPU (`TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES`), Cloud TPU VMs
  (the metadata server's `agent-worker-number` and `worker-network-endpoints`: what
  `gcloud compute tpus tpu-vm ssh --worker=all` gives), Kubernetes (with `jax[k8s]`).
`JAX_COORDINATOR_PORT` overrides the port JAX derives. A cluster of one process (one TPU VM,
a one-task SLURM job) starts no coordinator.

Preemption (`PreemptionWatch`): SIGTERM to any process makes every process stop after the
same step. With several processes JAX's preemption service does it (it catches SIGTERM
itself and agrees on the step through the coordinator); where that service is switched
off (`jax_enable_preemption_service`), the processes share their SIGTERM flags at logging
steps. The trainer then saves one checkpoint together and exits `PREEMPTED_EXIT`.
"""

from __future__ import annotations

import json
import os
import signal

import jax
import numpy as np

from sdjax.errors import UserError

# sysexits.h EX_TEMPFAIL: "try again later". The launchers requeue / rerun on it.
PREEMPTED_EXIT = 75


def _detectors() -> list:
    from jax._src import clusters

    return [c for c in clusters.ClusterEnv._cluster_types if not c.opt_in_only_method]


def _detected():
    """JAX's cluster class for this environment, or None."""
    return next((c for c in _detectors() if c.is_env_present()), None)


def cluster_environment() -> str | None:
    """'env' (JAX_COORDINATOR_ADDRESS), the name of the JAX detector that recognises this
    environment ('ompi', 'slurm', 'gketpu', 'gcetpu', 'K8sCluster'), or None."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    found = _detected()
    return (found.name or found.__name__) if found else None


def describe() -> dict | None:
    """What `initialize` passes to `jax.distributed.initialize`: kind, coordinator,
    num_processes, process_id, local_device_ids (None entries: JAX's defaults); None when
    no cluster is described."""
    from jax._src import clusters

    kind = cluster_environment()
    if kind is None:
        return None
    address = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
    params = (
        address,
        int(count) if count else None,
        int(index) if index else None,
        [int(i) for i in local.split(",")] if local else None,
    )
    if None in params[:3]:
        method = None if kind in ("env", "K8sCluster") else kind
        params = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            *params, cluster_detection_method=method, initialization_timeout=300
        )
    address, count, index, local = params
    if count is None or index is None or address is None:
        raise UserError(
            f"cluster ({kind}) is incomplete: coordinator {address}, {count} processes, "
            f"process id {index} (set JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
        )
    return {
        "kind": kind,
        "coordinator": address,
        "num_processes": count,
        "process_id": index,
        "local_device_ids": local,
    }


def initialize() -> None:
    """Join the cluster described by the environment (no-op for a single process)."""
    if jax.distributed.is_initialized():
        return
    found = describe()
    if found is None or found["num_processes"] == 1:
        return
    print(
        f"joining a {found['kind']} cluster: process {found['process_id']} of "
        f"{found['num_processes']}, coordinator {found['coordinator']}",
        flush=True,
    )
    jax.distributed.initialize(
        coordinator_address=found["coordinator"],
        num_processes=found["num_processes"],
        process_id=found["process_id"],
        local_device_ids=found["local_device_ids"],
    )


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
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size]))).ravel()
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]


class PreemptionWatch:
    """Answers "stop after this step?" identically on every process (module docstring).

    Call `reached(step, shared)` at every step, the same steps on every process; `shared`
    marks steps where all processes may exchange a flag (the logging steps). `close()`
    restores the previous SIGTERM handler.
    """

    def __init__(self):
        from jax._src import distributed as jax_distributed

        self.signalled = False
        self._multi = jax.process_count() > 1
        self._service = (
            self._multi and jax_distributed.global_state.preemption_sync_manager is not None
        )
        self._previous = None
        if not self._service:  # JAX's service installs its own SIGTERM handler: keep it
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True

    def reached(self, step: int, shared: bool) -> bool:
        if self._service:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        if not self._multi:
            return self.signalled
        if not shared:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([int(self.signalled)], np.int32))
        return bool(np.asarray(flags).max())

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
