"""Cluster start-up per environment (sdjax.parallel.distributed follows JAX's detection),
and collective preemption: SIGTERM to one process stops every process at the same step.

Environments without their machines are reproduced with what JAX reads there: SLURM's and
GKE's variables, and for Cloud TPU VMs a metadata server on loopback (JAX honours
GCE_METADATA_IP). The TPU VM and preemption tests start real processes that join through
a real coordinator.
"""

import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from sdjax.parallel import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLUSTER_VARS = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "JAX_LOCAL_DEVICE_IDS",
    "JAX_COORDINATOR_PORT",
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "TPU_WORKER_ID",
    "KUBERNETES_SERVICE_HOST",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_single_process_joins_nothing(clean_env):
    assert distributed.cluster_environment() is None
    assert distributed.describe() is None


def test_explicit_coordinator(clean_env):
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:1234")
    clean_env.setenv("JAX_NUM_PROCESSES", "4")
    clean_env.setenv("JAX_PROCESS_ID", "3")
    clean_env.setenv("JAX_LOCAL_DEVICE_IDS", "0,1")
    assert distributed.describe() == {
        "kind": "env",
        "coordinator": "10.0.0.2:1234",
        "num_processes": 4,
        "process_id": 3,
        "local_device_ids": [0, 1],
    }


def test_slurm_one_process_per_gpu(clean_env):
    # What srun sets for task 11 of a 4-node x 8-GPU job.
    for key, value in {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "gpu[017-020]",
        "SLURM_NTASKS": "32",
        "SLURM_PROCID": "11",
        "SLURM_LOCALID": "3",
    }.items():
        clean_env.setenv(key, value)
    assert distributed.describe() == {
        "kind": "slurm",
        "coordinator": f"gpu017:{4242 % 4096 + 61440}",
        "num_processes": 32,
        "process_id": 11,
        "local_device_ids": [3],  # the task's own GPU: no CUDA_VISIBLE_DEVICES needed
    }
    # One process per node: JAX_LOCAL_DEVICE_IDS gives it all the node's GPUs.
    clean_env.setenv("JAX_LOCAL_DEVICE_IDS", "0,1,2,3,4,5,6,7")
    assert distributed.describe()["local_device_ids"] == list(range(8))


def test_a_one_task_slurm_job_starts_no_coordinator(clean_env):
    for key, value in {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "gpu001",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }.items():
        clean_env.setenv(key, value)
    assert distributed.describe()["num_processes"] == 1
    distributed.initialize()  # a no-op: nothing to join
    assert not __import__("jax").distributed.is_initialized()


# Cloud TPU: JAX only looks for a TPU pod on a TPU VM. Without TPU chips, JAX_FORCE_TPU_INIT
# makes it act as on one; it then also sets TPU_SKIP_MDS_QUERY (no chips), which a real TPU
# VM never has, so the probe script drops it for the TPU VM case. GKE sets it itself.
PROBE = """
import json, os, sys
import jax
if {vm}:
    os.environ.pop("TPU_SKIP_MDS_QUERY", None)
sys.path.insert(0, {root!r})
from sdjax.parallel import distributed
print("DESCRIBE " + json.dumps(distributed.describe()), flush=True)
if {join}:
    distributed.initialize()
    distributed.barrier("probe")
    print("JOINED", jax.process_index(), jax.process_count(), flush=True)
"""


def probe_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
    env.update(JAX_PLATFORMS="cpu", JAX_FORCE_TPU_INIT="1", XLA_FLAGS="", **extra)
    return env


def run_probes(envs: list[dict], join: bool, vm: bool) -> list[str]:
    code = PROBE.format(root=ROOT, join=join, vm=vm)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for env in envs
    ]
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        outputs.append(out)
    return outputs


def described(output: str) -> dict:
    import json

    line = next(line for line in output.splitlines() if line.startswith("DESCRIBE "))
    return json.loads(line.removeprefix("DESCRIBE "))


class Metadata(http.server.BaseHTTPRequestHandler):
    """The GCE metadata server's TPU attributes for one worker of a 2-worker slice."""

    worker = "0"

    def do_GET(self):
        attributes = {
            "agent-worker-number": self.worker,
            "worker-network-endpoints": "w0:0:127.0.0.1,w1:1:127.0.0.1",
            "tpu-env": "ACCELERATOR_TYPE: 'v5p-16'\n",
        }
        key = self.path.rsplit("/", 1)[-1]
        ok = self.headers.get("Metadata-Flavor") == "Google" and key in attributes
        body = attributes.get(key, "").encode() if ok else b"not found"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def metadata_servers(count: int):
    servers = []
    for worker in range(count):
        handler = type("Worker", (Metadata,), {"worker": str(worker)})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        yield [f"127.0.0.1:{s.server_address[1]}" for s in servers]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_tpu_vm_pod_workers_find_each_other_through_the_metadata_server():
    port = str(free_port())
    with metadata_servers(2) as addresses:
        envs = [probe_env(GCE_METADATA_IP=a, JAX_COORDINATOR_PORT=port) for a in addresses]
        outputs = run_probes(envs, join=True, vm=True)
    for worker, out in enumerate(outputs):
        assert described(out) == {
            "kind": "gcetpu",
            "coordinator": f"127.0.0.1:{port}",
            "num_processes": 2,
            "process_id": worker,
            "local_device_ids": None,  # JAX never restricts TPU devices
        }
        assert f"JOINED {worker} 2" in out


def test_gke_tpu_worker():
    with metadata_servers(1) as (address,):  # a GKE node's (JAX reads its tpu-env)
        env = probe_env(
            GCE_METADATA_IP=address,
            TPU_WORKER_HOSTNAMES="localhost,tpu-1,tpu-2,tpu-3",
            TPU_WORKER_ID="2",
            TPU_SKIP_MDS_QUERY="true",  # as GKE sets it
        )
        (out,) = run_probes([env], join=False, vm=False)
    assert described(out) == {
        "kind": "gketpu",
        "coordinator": "localhost:8482",
        "num_processes": 4,
        "process_id": 2,
        "local_device_ids": None,
    }


# Collective preemption without a model: processes step at different speeds; SIGTERM goes
# to one of them only; all must report the same stop step.
PREEMPT = """
import os, sys, time
sys.path.insert(0, {root!r})
import jax
from sdjax.parallel import distributed
distributed.initialize()
watch = distributed.PreemptionWatch()
print("READY", flush=True)
for step in range(1, 100000):
    time.sleep(0.02 * (1 + jax.process_index()))
    if watch.reached(step, shared=step % 5 == 0):
        print("STOP", step, flush=True)
        sys.exit(75)
"""


def process_id(pid: int) -> str | None:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    value = env.get(b"JAX_PROCESS_ID")
    return value.decode() if value else None


@pytest.mark.parametrize("service", ["jax", "flag"])
def test_sigterm_to_one_process_stops_all_at_the_same_step(service, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS and k != "XLA_FLAGS"}
    if service == "flag":  # JAX's preemption service off: the shared-flag fallback
        env["JAX_ENABLE_PREEMPTION_SERVICE"] = "false"
    script = tmp_path / "preempt.py"
    script.write_text(PREEMPT.format(root=ROOT))
    launcher = subprocess.Popen(
        [os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "-d", "1", "--"]
        + [sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    deadline = time.time() + 300
    while sum("READY" in line for line in lines) < 2:
        line = launcher.stdout.readline()
        assert line or launcher.poll() is None, "".join(lines)
        lines.append(line)
        assert time.time() < deadline
    time.sleep(1.0)
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(launcher.pid)], capture_output=True, text=True
    ).stdout.split()
    rank1 = next(pid for pid in map(int, children) if process_id(pid) == "1")
    os.kill(rank1, signal.SIGTERM)
    out, _ = launcher.communicate(timeout=300)
    lines.append(out)
    text = "".join(lines)
    stops = {row.split()[0]: int(row.split()[2]) for row in text.splitlines() if " STOP " in row}
    assert launcher.returncode == 75, text
    assert set(stops) == {"[0]", "[1]"} and stops["[0]"] == stops["[1]"], stops


@pytest.mark.slow
def test_training_preempted_on_one_process_saves_one_step_on_all(tmp_path):
    # The same through `sdjax train`: 2 processes, SIGTERM to process 1 only.
    from sdjax.data.generate import write_toy_dataset

    data = tmp_path / "data"
    write_toy_dataset(str(data), 64, size=32, workers=1, overwrite=True)
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS and k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    launcher = subprocess.Popen(
        [os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "-d", "4", "--"]
        + [
            sys.executable,
            "-m",
            "sdjax",
            "train",
            "--config",
            os.path.join(HERE, "train_config.py"),
        ]
        + ["--workdir", str(workdir), "--set", f"data.path={data}"]
        + ["--set", "train.num_steps=100000", "--set", "mesh.data=2", "--set", "mesh.fsdp=4"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    marker = workdir / "checkpoints" / "4" / "commit_success.txt"
    deadline = time.time() + 1200
    while not marker.exists():
        assert launcher.poll() is None, launcher.stdout.read()
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.5)
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(launcher.pid)], capture_output=True, text=True
    ).stdout.split()
    os.kill(next(p for p in map(int, children) if process_id(p) == "1"), signal.SIGTERM)
    out, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 75, out
    said = sorted(line for line in out.splitlines() if "preempted: every process saved" in line)
    assert len(said) == 2 and said[0].split("step")[1] == said[1].split("step")[1], said
    step = int(said[0].split("step ")[1].split(";")[0])
    saved = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    last_logged = int(
        (workdir / "metrics.jsonl").read_text().splitlines()[-1].split('"step": ')[1].split(",")[0]
    )
    assert saved == step == last_logged > 4
