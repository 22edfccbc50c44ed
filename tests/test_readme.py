"""README's Python examples run as written, from `examples/`, with the embedded model."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
REFERENCES = ("star.png", "ring.png", "ring_mask.png")


def readme_blocks(after: str) -> list[str]:
    """The ```python blocks of README's section `after` (up to the next ## heading)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index(f"\n{after}\n") :]
    section = section[: section.find("\n## ", 1)] if "\n## " in section[1:] else section
    return re.findall(r"```python\n(.*?)```", section, re.S)


def embedded_resolution() -> int:
    with open(os.path.join(ROOT, "sdjax", "assets", "default_model", "model.json")) as f:
        return json.load(f)["config"]["resolution"]


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": os.environ.get("SDJAX_TEST_JAX_CACHE", "/tmp/sdjax-jax-cache"),
    }
    env.pop("XLA_FLAGS", None)  # as a user runs it: use_cpu_cores() picks the devices
    # An unknown word or a cut prompt in the example would be a silent bug: make it fatal.
    argv = [sys.executable, "-W", "error::sdjax.errors.InputWarning", "-c", code]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def examples(tmp_path):
    for name in REFERENCES:
        shutil.copy(os.path.join(EXAMPLES, name), tmp_path)
    return tmp_path


def test_python_api_example_runs_verbatim(examples):
    (code,) = readme_blocks("## Python API")
    done = run_python(code, examples)
    assert done.returncode == 0, done.stderr[-3000:]
    size = embedded_resolution()
    with Image.open(examples / "out.png") as im:
        assert im.size == (size, size)
        assert np.asarray(im).std() > 5  # an image, not a constant


def test_example_references_are_what_their_script_writes(tmp_path):
    shutil.copy(os.path.join(EXAMPLES, "make_references.py"), tmp_path)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "make_references.py")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for name in REFERENCES:
        with Image.open(tmp_path / name) as made, Image.open(os.path.join(EXAMPLES, name)) as ours:
            assert made.mode == ours.mode
            np.testing.assert_array_equal(np.asarray(made), np.asarray(ours))
    with Image.open(os.path.join(EXAMPLES, "star.png")) as star:
        assert star.mode == "RGBA"  # the example's cut-out: its alpha is its mask


def test_documented_public_names_exist():
    import sdjax

    assert callable(sdjax.models.UNet) and callable(sdjax.convert.unet_from_diffusers)
    from sdjax.convert import unet_from_diffusers  # noqa: F401
    from sdjax.diffusion.ddim import sample_loop  # noqa: F401
    from sdjax.models import UNet, UNetConfig  # noqa: F401

    assert {"Subject", "load_pipeline", "sample"} <= set(dir(sdjax)) | set(sdjax.__all__)


@pytest.mark.slow
def test_pytorch_example_runs_verbatim(examples):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    model = os.path.join(ROOT, "sdjax", "assets", "default_model")
    export = [sys.executable, "-m", "sdjax", "export", model, "toy_torch"]
    done = subprocess.run(export, cwd=examples, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (code,) = readme_blocks("## Export")
    done = run_python(code, examples)
    assert done.returncode == 0, done.stderr[-3000:]
    size = embedded_resolution()
    assert f"(1, {size}, {size}, 3)" in done.stdout
