"""Sampling: one compile per shape, determinism, interpolation, input validation, the CLI."""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import sdjax
import sdjax.sampling as sampling
from sdjax.cli import main
from sdjax.errors import UserError
from sdjax.pipeline import load_pipeline
from sdjax.sampling import generate

STEPS = 4


def red_square(h=20, w=30):
    ref = np.full((h, w, 3), 255, np.uint8)
    ref[5:15, 10:20] = [200, 30, 30]
    return ref


def run(pipe, prompt="a red star on white background", subjects=None, **kw):
    subjects = [sdjax.Subject(red_square(), "star")] if subjects is None else subjects
    images = sdjax.sample(pipe, prompt, subjects, num_steps=STEPS, **kw)
    return np.stack([np.asarray(im) for im in images])


def sampler_cache_size() -> int:
    return sampling.sampler("cpu")._cache_size()


def test_new_prompt_seed_subjects_and_scales_do_not_recompile(pipe):
    run(pipe, num_images=2)
    before = sampler_cache_size()
    two = [
        sdjax.Subject(red_square(), "ring", box=(0.1, 0.1, 0.5, 0.6)),
        sdjax.Subject(red_square(9, 9), "square"),
    ]
    run(
        pipe,
        "a blue ring and a square",
        two,
        num_images=2,
        seed=7,
        text_scale=2.0,
        image_scale=0.5,
        subject_fraction=0.5,
    )
    run(pipe, "green", [], num_images=2, seed=8)
    assert sampler_cache_size() == before


def test_unset_guidance_scales_are_the_models(pipe):
    scales = dict(text_scale=2.0, image_scale=0.5)
    own = dataclasses.replace(pipe, config=dataclasses.replace(pipe.config, **scales))
    np.testing.assert_array_equal(run(own, seed=4), run(pipe, seed=4, **scales))
    assert not np.array_equal(run(pipe, seed=4), run(pipe, seed=4, **scales))


def test_same_seed_same_images_other_seed_differs(pipe):
    a, b, c = run(pipe, seed=1), run(pipe, seed=1), run(pipe, seed=2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).max() > 0
    assert a.shape == (1, 16, 16, 3) and a.dtype == np.uint8


def test_each_image_of_a_batch_gets_its_own_noise(pipe):
    images = run(pipe, num_images=2)
    assert np.abs(images[0].astype(int) - images[1]).max() > 0


def test_a_batch_split_over_cpu_devices_gives_the_images_of_one_device(pipe):
    assert len(sampling.split_devices(2)) == 2  # conftest: 8 CPU devices
    assert len(sampling.split_devices(3)) == 1 and len(sampling.split_devices(12)) == 4
    one = sampling.prepare_inputs(pipe, "a red star", [sdjax.Subject(red_square(), "star")])
    batch = {k: np.stack([v, v]) for k, v in one.items()}
    args = (pipe.params, batch, jax.random.key(5), 3.0, 1.5, STEPS)

    def images(devices):
        return np.asarray(generate(pipe.config, STEPS, *args, devices=devices))

    split, whole = images(None), images(jax.local_devices()[:1])
    assert np.abs(split.astype(int) - whole).max() <= 1


def test_use_cpu_cores_gives_one_device_per_core_before_jax_starts():
    code = (
        "import os, jax; from sdjax.parallel.cpu import use_cpu_cores;"
        "n = use_cpu_cores(); print(n, len(jax.devices()), len(os.sched_getaffinity(0)),"
        " use_cpu_cores())"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    n, devices, cores, again = out.stdout.split()
    assert n == devices == cores and again == "None"


def test_subject_fraction_zero_ignores_the_subjects(pipe):
    blue = red_square()
    blue[5:15, 10:20] = [20, 20, 220]
    kw = dict(subject_fraction=0.0, seed=3)
    a = run(pipe, subjects=[sdjax.Subject(red_square(), "star")], **kw)
    b = run(pipe, subjects=[sdjax.Subject(blue, "star", box=(0, 0, 0.5, 0.5))], **kw)
    np.testing.assert_array_equal(a, b)
    c = run(pipe, subjects=[sdjax.Subject(blue, "star", box=(0, 0, 0.5, 0.5))], seed=3)
    assert np.abs(a.astype(int) - c).max() > 0


@pytest.mark.parametrize(
    "subject, kwargs, message",
    [
        (sdjax.Subject("/nonexistent.png", "dog"), {}, "cannot read subject 1 image"),
        (
            sdjax.Subject(red_square(), "dog", mask=np.ones((5, 5), np.uint8) * 255),
            {},
            "mask is 5x5 but its image is 30x20",
        ),
        (
            sdjax.Subject(red_square(), "dog", mask=np.zeros((20, 30), np.uint8)),
            {},
            "mask is empty",
        ),
        (sdjax.Subject(red_square(), "dog", box=(0.2, 0.2, 1.3, 0.5)), {}, "outside [0, 1]"),
        (sdjax.Subject(red_square(), "dog", box=(0.5, 0.2, 0.4, 0.5)), {}, "x1 < x2"),
        (sdjax.Subject(red_square(), " "), {}, "empty label"),
        (sdjax.Subject(red_square(), "dog"), {"num_steps": 0}, "steps must be at least 1"),
        (sdjax.Subject(red_square(), "dog"), {"text_scale": -1.0}, "scales must be >= 0"),
    ],
)
def test_bad_input_is_a_one_line_user_error(pipe, subject, kwargs, message):
    kwargs = {"num_steps": STEPS, **kwargs}
    with pytest.raises(UserError) as err:
        sdjax.sample(pipe, "a dog", [subject], **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_too_many_subjects(pipe):
    with pytest.raises(UserError, match="at most 2"):
        sdjax.sample(pipe, "x", [sdjax.Subject(red_square(), "a")] * 3, num_steps=STEPS)


def test_cli_on_a_real_photo_with_its_mask(folder, shared_data, tmp_path):
    photo = os.path.join(shared_data, "elite_masked", "1.jpg")
    mask = os.path.join(shared_data, "elite_masked", "1_bg.png")
    out = tmp_path / "out.png"
    code = main(
        [
            "sample",
            "--checkpoint",
            folder,
            "--prompt",
            "a red star on white background",
            "--subject",
            photo,
            "--label",
            "star",
            "--mask",
            mask,
            "--box",
            "0.1,0.2,0.6,0.9",
            "--out",
            str(out),
            "--steps",
            str(STEPS),
            "--num-images",
            "2",
            "--seed",
            "5",
        ]
    )
    assert code == 0
    with Image.open(out) as im:
        assert im.size == (32, 16)  # two 16 px images side by side
        assert im.text["seed"] == "5" and im.text["prompt"] == "a red star on white background"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--subject", "/nonexistent.jpg", "--label", "dog"], "cannot read subject 1 image"),
        (
            ["--subject", "{photo}", "--label", "dog", "--box", "0,0,1,1", "--box", "0,0,1,1"],
            "subject 1 (",
        ),
        (["--subject", "{photo}", "--label", "dog", "--mask", "{other_mask}"], "mask is"),
        (["--subject", "{photo}", "--label", "dog", "--box", "0,0,2,1"], "outside [0, 1]"),
        (["--subject", "{photo}", "--label", ""], "empty label"),
        (["--subject", "{photo}", "--label", "dog", "--steps", "0"], "steps must be at least 1"),
        (["--subject", "{photo}", "--label", "dog", "--image-scale", "-2"], "scales must be"),
        (
            ["--subject", "{photo}", "--label", "dog", "--checkpoint", "/nonexistent"],
            "checkpoint folder not found",
        ),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_no_file(
    args, message, folder, shared_data, tmp_path, capsys
):
    photo = os.path.join(shared_data, "elite_masked", "1.jpg")
    other_mask = os.path.join(shared_data, "elite_masked", "2_bg.png")
    args = [a.format(photo=photo, other_mask=other_mask) for a in args]
    if "--checkpoint" not in args:
        args += ["--checkpoint", folder]
    out = tmp_path / "out.png"
    try:
        code = main(["sample", "--prompt", "a dog", "--out", str(out), "--steps", "2", *args])
    except SystemExit as exit:  # argparse's errors (same contract: one line, status 2)
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists() and not os.path.exists(str(out) + ".tmp")


def test_pipeline_folder_round_trip(pipe, folder):
    loaded = load_pipeline(folder)
    assert loaded.config == pipe.config
    for part in pipe.params:
        jax_tree_equal(loaded.params[part], pipe.params[part])
    np.testing.assert_array_equal(run(loaded, seed=4), run(pipe, seed=4))


def jax_tree_equal(a, b):
    import jax

    jax.tree.map(np.testing.assert_array_equal, a, b)
