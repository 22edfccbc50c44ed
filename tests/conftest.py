"""Test environment: an 8-device CPU mesh, jax's persistent compilation cache, quiet libraries.

XLA_FLAGS must be set before jax is first imported, so this runs at conftest import time.
"""

import os
import tempfile

# 8 CPU devices for mesh tests; optimisation level 0 halves XLA's CPU compile time, which
# dominates these tiny models' test time (their run time hardly changes).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

# Compiles dominate test time on 2 cores; a cache shared across runs makes reruns cheap.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("SDJAX_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "sdjax-jax-cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _silence_libraries():
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


_silence_libraries()


@pytest.fixture(scope="session")
def shared_data():
    """The project's shared real data (../shared/data), or a skip where it is absent."""
    root = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
    root = os.environ.get("SDJAX_SHARED_DATA", root)
    if not os.path.isdir(root):
        pytest.skip(f"shared data not found at {root}")
    return os.path.abspath(root)


@pytest.fixture(scope="session")
def pipe():
    """The tiny test model (tests/tiny.py), shared by every module: do not modify it."""
    from tiny import tiny_pipeline

    return tiny_pipeline()


@pytest.fixture(scope="session")
def folder(pipe, tmp_path_factory):
    """`pipe` saved as a pipeline folder."""
    from sdjax.pipeline import save_pipeline

    path = str(tmp_path_factory.mktemp("tiny_pipeline"))
    save_pipeline(pipe, path)
    return path
