"""The launchers, run for real: launch/local.sh; launch/gpu_slurm.sbatch under stand-ins for
srun and scontrol (as SLURM would run it: task variables set, one process per task);
launch/tpu_pod.sh under a stand-in for gcloud whose "workers" are local home folders (what
runs there is the real launch/tpu_worker.sh)."""

import os
import random
import shutil
import signal
import stat
import subprocess
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOCAL = os.path.join(ROOT, "launch", "local.sh")
SBATCH = os.path.join(ROOT, "launch", "gpu_slurm.sbatch")
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def executable(path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


# launch/local.sh


def test_local_exits_with_the_first_failure_status():
    done = subprocess.run([LOCAL, "-n", "2", "--", "bash", "-c", "exit 3"], timeout=60)
    assert done.returncode == 3


def test_local_prefixes_output_and_passes_success():
    done = subprocess.run(
        [LOCAL, "-n", "3", "--", "bash", "-c", 'echo "id $JAX_PROCESS_ID of $JAX_NUM_PROCESSES"'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert sorted(done.stdout.splitlines()) == ["[0] id 0 of 3", "[1] id 1 of 3", "[2] id 2 of 3"]


def test_local_stops_every_process_and_its_children_when_one_fails(tmp_path):
    # Process 1 fails; process 0 and both processes' children would otherwise run on.
    script = f"""
sleep 300 & echo $! > {tmp_path}/child.$JAX_PROCESS_ID
echo $$ > {tmp_path}/main.$JAX_PROCESS_ID
if [ "$JAX_PROCESS_ID" = 1 ]; then sleep 1; exit 4; fi
wait
"""
    start = time.time()
    done = subprocess.run(
        [LOCAL, "-n", "2", "--", "bash", "-c", script],
        env={**os.environ, "SDJAX_LAUNCH_GRACE": "5"},
        timeout=120,
    )
    assert done.returncode == 4
    assert time.time() - start < 60
    pids = [
        int((tmp_path / f"{kind}.{i}").read_text()) for kind in ("main", "child") for i in (0, 1)
    ]
    assert not any(alive(p) for p in pids)


def test_local_passes_sigterm_on_and_reports_the_processes_status(tmp_path):
    # sdjax saves and exits 75 on SIGTERM; a stand-in does just that.
    proc = subprocess.Popen(
        [LOCAL, "-n", "2", "--", "bash", "-c", 'trap "exit 75" TERM; sleep 300 & wait'],
    )
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75


# launch/gpu_slurm.sbatch


FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: one local process per task, with the variables srun gives a task.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < FAKE_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=$FAKE_NTASKS SLURM_STEP_NODELIST=localhost \\
    SLURM_STEP_NUM_NODES=1 "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  code=0; wait "$pid" || code=$?; [ $code -gt $status ] && status=$code
done
exit $status
"""


@pytest.fixture
def slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "srun", FAKE_SRUN)
    executable(bin_dir / "scontrol", f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/scontrol\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    job = str(random.randrange(1, 4096))  # JAX derives the coordinator port from it
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        SLURM_SUBMIT_DIR=ROOT,
        SLURM_JOB_ID=job,
        FAKE_NTASKS="2",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="",
    )

    def sbatch(*command):
        done = subprocess.run(
            ["bash", SBATCH, *command], env=env, capture_output=True, text=True, timeout=300
        )
        requeues = (tmp_path / "scontrol").read_text() if (tmp_path / "scontrol").exists() else ""
        return done, requeues

    return sbatch, job


def test_slurm_requeues_a_preempted_run_and_leaves_gpus_to_jax(slurm):
    sbatch, job = slurm
    done, requeues = sbatch("bash", "-c", 'echo "cuda=${CUDA_VISIBLE_DEVICES-unset}"; exit 75')
    assert done.returncode == 0, done.stderr
    assert requeues == f"requeue {job}\n"
    assert done.stdout.count("cuda=unset") == 2


def test_slurm_passes_other_failures_without_requeue(slurm):
    sbatch, _ = slurm
    done, requeues = sbatch("bash", "-c", "exit 3")
    assert done.returncode == 3
    assert requeues == ""


def test_slurm_tasks_join_through_jax_slurm_detection(slurm):
    sbatch, _ = slurm
    probe = (
        "import jax; from sdjax.parallel import distributed; distributed.initialize(); "
        "distributed.barrier('probe'); "
        # one write(2) per line: the two tasks share the pipe, and print() may write in pieces
        "import os; os.write(1, f'joined {jax.process_index()} {jax.process_count()}\\n'.encode())"
    )
    done, _ = sbatch("python", "-c", probe)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("joined")) == [
        "joined 0 2",
        "joined 1 2",
    ]


# launch/tpu_pod.sh + launch/tpu_worker.sh


FAKE_GCLOUD = """#!/usr/bin/env bash
# gcloud stand-in: `compute tpus tpu-vm ssh|scp ... --worker=all` over local worker homes.
echo "$*" >> "$FAKE_GCLOUD_LOG"
[ "$1 $2 $3" = "compute tpus tpu-vm" ] || exit 64
op=$4; shift 4
case $op in
  ssh)
    while [ $# -gt 0 ]; do [ "$1" = --command ] && command=$2; shift; done
    for home in $FAKE_WORKERS; do HOME=$home bash -c "$command" || exit $?; done ;;
  scp)
    src=$1; dest=${2#*:}; dest=${dest#\\~/}
    for home in $FAKE_WORKERS; do cp "$src" "$home/$dest"; done ;;
  *) exit 64 ;;
esac
"""

SLEEPER = (
    "import signal, sys, time; "
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); "
    "print('training', flush=True); time.sleep(300)"
)


@pytest.fixture
def pod(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "gcloud", FAKE_GCLOUD)
    workers = [tmp_path / f"worker{i}" for i in range(2)]
    for home in workers:
        (home / "sdjax").mkdir(parents=True)
        # what `--setup` leaves behind: a venv (here, this checkout's)
        os.symlink(os.path.join(ROOT, ".venv"), home / "sdjax" / ".venv")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_WORKERS": " ".join(map(str, workers)),
        "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud.log"),
        "GRACE": "60",
    }

    def tpu_pod(*args):
        return subprocess.run(
            [TPU_POD, "my-tpu", "us-central2-b", "my-project", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    yield tpu_pod, workers, tmp_path / "gcloud.log"
    tpu_pod("--stop", "--now")


def test_tpu_pod_syncs_the_package_runs_detached_and_stops_with_a_checkpoint(pod):
    tpu_pod, workers, gcloud_log = pod
    if not os.path.exists(os.path.join(ROOT, ".venv", "bin", "activate")):
        pytest.skip("needs the checkout's .venv")
    started = time.time()
    done = tpu_pod("--", "python", "-c", SLEEPER)
    assert done.returncode == 0, done.stderr
    assert time.time() - started < 60  # detached: returns while the run goes on
    calls = gcloud_log.read_text().splitlines()
    assert all("--worker=all" in c and "--project my-project" in c for c in calls)
    for home in workers:
        synced = sorted(os.listdir(home / "sdjax"))
        assert synced == [
            ".venv",
            "README.md",
            "configs",
            "launch",
            "logs",
            "pyproject.toml",
            "run",
            "sdjax",
        ]
        assert os.listdir(home / "sdjax" / "launch") == ["tpu_worker.sh"]
        assert not list((home / "sdjax" / "sdjax").rglob("__pycache__"))

    deadline = time.time() + 120
    while (status := tpu_pod("--status")).stdout.count("training") < 2:
        assert time.time() < deadline, status.stdout + status.stderr
        time.sleep(0.5)
    assert status.stdout.count("running (pid") == 2

    done = tpu_pod("--stop")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("exited 75") == 2
    status = tpu_pod("--status")
    assert status.stdout.count("exited 75") == 2
    # a second start refuses nothing now, and the code sync keeps logs and the venv
    assert tpu_pod("--", "python", "-c", "print('again')").returncode == 0
    assert (workers[0] / "sdjax" / ".venv").is_symlink()


def test_tpu_pod_refuses_a_second_run_while_one_is_alive(pod):
    tpu_pod, _, _ = pod
    if not os.path.exists(os.path.join(ROOT, ".venv", "bin", "activate")):
        pytest.skip("needs the checkout's .venv")
    assert tpu_pod("--", "python", "-c", SLEEPER).returncode == 0
    again = tpu_pod("--", "python", "-c", SLEEPER)
    assert again.returncode != 0 and "already running" in again.stderr


def test_launch_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (make lint installs and runs it)")
    scripts = [
        os.path.join(ROOT, "launch", n) for n in sorted(os.listdir(os.path.join(ROOT, "launch")))
    ]
    done = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_local_ctrl_c_in_a_terminal_lets_the_processes_save(tmp_path):
    # Ctrl-C reaches the terminal's foreground group (the launcher and its output
    # printers); the processes get SIGTERM from the launcher and their last words print.
    import pty

    script = 'trap "echo saving; sleep 1; echo saved; exit 75" TERM; echo up; sleep 300 & wait'
    pid, fd = pty.fork()
    if pid == 0:  # the child: the launcher, as from a shell prompt
        # (where Ctrl-C is not ignored, as it is for a test run started in the background)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(LOCAL, [LOCAL, "-n", "2", "--", "bash", "-c", script])
    output = b""
    deadline = time.time() + 60
    while output.count(b"up") < 2 and time.time() < deadline:
        output += os.read(fd, 1024)
    os.write(fd, b"\x03")  # Ctrl-C
    while time.time() < deadline:
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # the terminal closed: the launcher exited
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 75, output
    assert output.count(b"saved") == 2, output
