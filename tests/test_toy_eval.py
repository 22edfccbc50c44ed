"""Toy-world evaluation: the attribute classifier (training, shipped weights), the metrics on
images with known answers, `evaluate_toy` end to end, and the `eval toy` command line."""

import argparse
import dataclasses
import itertools
import json
import os

import numpy as np
import pytest
from PIL import Image
from tiny import pipeline_for, tiny_config

from sdjax.conditioning import mask_box
from sdjax.data.toy import PALETTE, ToyWorld, render_subject, vocabulary
from sdjax.errors import UserError
from sdjax.eval.cli import add_parser
from sdjax.eval.toy import evaluate_toy
from sdjax.eval.toy_cases import exchange_boxes, make_cases, render_target
from sdjax.eval.toy_classifier import (
    ClassifierConfig,
    load_classifier,
    make_crop_set,
    save_classifier,
    train_classifier,
)
from sdjax.eval.toy_metrics import (
    METRICS,
    background_name,
    box_iou,
    chance_iou,
    foreground,
    measure,
    obedience,
    reference_table,
    subject_mask,
    summarise,
)
from sdjax.pipeline import save_pipeline
from sdjax.tokenizer import Tokenizer

WORLD = ToyWorld()
R = 32  # the toy model's resolution, which the shipped classifier reads


def toy_pipeline():
    """The tiny random test model (16 px) with a text vocabulary of the toy world's words."""
    base = tiny_config()
    tokens = Tokenizer.for_vocabulary(vocabulary(), base.text.max_position_embeddings)
    ids = tokens.vocab_subset
    text = dataclasses.replace(
        base.text,
        vocab_size=tokens.vocab_size,
        bos_token_id=ids.index(49406),
        eos_token_id=ids.index(49407),
        pad_token_id=ids.index(49407),
    )
    return pipeline_for(dataclasses.replace(base, text=text, vocab_subset=ids))


@pytest.fixture(scope="module")
def toy_pipe():
    """A toy-size model (configs/toy.py sizes) with random weights."""
    return toy_pipeline()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def shipped():
    """The embedded model: its toy CLIP image encoder gives the metrics' embeddings."""
    from sdjax.pipeline import load_pipeline

    return load_pipeline()


@pytest.fixture(scope="module")
def table(shipped):
    return reference_table(shipped, WORLD)


def boxed_cases(n=8, seed=0):
    """Cases with requested boxes (one and two subjects)."""
    return [c for c in make_cases(WORLD, 2 * n, seed) if c.boxes][:n]


def scores(pipe, classifier, table, cases, images, boxes=None):
    boxes = boxes or [list(c.boxes) for c in cases]
    return summarise(cases, measure(pipe, classifier, cases, boxes, images, table, WORLD))


def test_classifier_training_lowers_its_loss_and_is_deterministic(tmp_path):
    config = ClassifierConfig.for_world(WORLD, crop=16, channels=(8, 16), hidden=16)
    data = make_crop_set(config, 40, seed=0)
    assert (data.labels[:, 0] < 0).any() and (data.labels[:, 0] >= 0).any()
    run = dict(steps=60, batch_size=32, lr=1e-2, config=config, data=data, progress=False)
    first, losses = train_classifier(seed=3, **run)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])
    _, again = train_classifier(seed=3, **run)
    assert again == losses
    save_classifier(first, str(tmp_path))
    loaded = load_classifier(str(tmp_path))
    assert loaded.config == config
    images, boxes = data.scenes[data.scene[:8]], data.boxes[:8]
    assert [p["shape"] for p in loaded.predict(images, boxes)] == [
        p["shape"] for p in first.predict(images, boxes)
    ]


def test_shipped_classifier_reads_every_shape_colour_and_pattern(classifier):
    images, boxes, truth = [], [], []
    for i, (shape, colour, pattern) in enumerate(
        itertools.product(WORLD.shapes, WORLD.colours, WORLD.patterns)
    ):
        size, background = WORLD.sizes[i % 2], WORLD.backgrounds[i % 4]
        image, mask = render_subject(WORLD, shape, colour, pattern, size, background)
        images.append(np.asarray(Image.fromarray(image).resize((R, R), Image.BICUBIC)))
        boxes.append(np.asarray(mask_box(mask)) / WORLD.size)
        truth.append({"present": True, "shape": shape, "colour": colour, "pattern": pattern})
    readings = classifier.predict(np.stack(images), np.stack(boxes))
    wrong = [(t, r) for t, r in zip(truth, readings) if any(r[k] != v for k, v in t.items())]
    assert not wrong, wrong[:5]
    # A box of plain background holds no subject.
    assert not classifier.predict(images[:1], [[0.0, 0.0, 0.2, 0.2]])[0]["present"]


def test_rendered_targets_score_perfectly(shipped, classifier, table):
    cases = boxed_cases()
    images = np.stack([render_target(WORLD, c, c.boxes, R) for c in cases])
    got = scores(shipped, classifier, table, cases, images)
    for key in ("shape", "colour", "pattern", "all", "present", "background"):
        assert got[key] == 1.0, key
    assert got["swap"] == 0.0 and got["leak"] == 0.0 and got["identity"] == 1.0
    assert got["iou"] > 0.85
    assert got["clip_i"] > 0.9  # the toy CLIP of the shipped model (chance about 0.02)


def test_blank_images_score_nothing(shipped, classifier, table):
    cases = boxed_cases()
    images = np.stack([np.full((R, R, 3), PALETTE[c.background], np.uint8) for c in cases])
    got = scores(shipped, classifier, table, cases, images)
    for key in ("shape", "colour", "pattern", "all", "present", "iou", "swap", "leak"):
        assert got[key] == 0.0, key
    assert got["background"] == 1.0


def test_swapped_and_leaked_subjects(shipped, classifier, table):
    cases = [c for c in boxed_cases() if len(c.subjects) == 2]
    # Each subject drawn in the other's box: every box shows the other's looks.
    swapped = np.stack([render_target(WORLD, c, c.boxes[::-1], R) for c in cases])
    got = scores(shipped, classifier, table, cases, swapped)
    assert got["swap"] == 1.0 and got["leak"] == 0.0 and got["colour"] == 0.0
    assert got["identity"] == 0.0
    # The first subject drawn in both boxes.
    leaked = [
        render_target(WORLD, dataclasses.replace(c, subjects=c.subjects[:1] * 2), c.boxes, R)
        for c in cases
    ]
    got = scores(shipped, classifier, table, cases, np.stack(leaked))
    assert got["leak"] == 1.0 and got["swap"] == 0.5


def test_box_obedience_reads_who_follows_the_exchanged_boxes(shipped, classifier, table):
    cases = [c for c in boxed_cases() if len(c.subjects) == 2]
    exchanged = [exchange_boxes(c) for c in cases]
    assert all(x.boxes == c.boxes[::-1] for x, c in zip(exchanged, cases))

    def obeyed(drawn_cases):
        images = np.stack([render_target(WORLD, c, c.boxes, R) for c in drawn_cases])
        boxes = [list(c.boxes) for c in exchanged]
        return obedience(
            exchanged, measure(shipped, classifier, exchanged, boxes, images, table, WORLD)
        )

    assert obeyed(exchanged) == 1.0  # each subject drawn in its new box
    assert obeyed(cases) == 0.0  # each drawn where it was before the exchange


def test_segmentation_boxes_and_background():
    image = np.full((R, R, 3), PALETTE["gray"], np.uint8)
    image += np.arange(R, dtype=np.uint8)[:, None, None]  # shading well under the threshold
    image[8:20, 4:12] = PALETTE["red"]
    image[30, 30] = PALETTE["blue"]  # a speck outside the box
    fg = foreground(image, "gray")
    assert fg.sum() == 12 * 8 + 1
    box = (4 / R, 8 / R, 12 / R, 20 / R)
    mask = subject_mask(fg, (0.0, 0.0, 0.25, 0.5))
    assert np.array_equal(np.asarray(mask_box(mask)) / R, box)
    assert not subject_mask(fg, (0.5, 0.0, 0.8, 0.3)).any()
    assert background_name(image, [box], WORLD.backgrounds) == "gray"
    assert box_iou(box, box) == pytest.approx(1.0)
    assert box_iou((0, 0, 0.5, 0.5), (0.25, 0, 0.75, 0.5)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 0.2, 0.2), (0.5, 0.5, 0.7, 0.7)) == 0.0
    assert chance_iou((0, 0, 1, 1)) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    starts = rng.uniform(0, 0.7, (20000, 2))
    sampled = np.mean([box_iou((0.1, 0.4, 0.4, 0.7), (x, y, x + 0.3, y + 0.3)) for x, y in starts])
    assert chance_iou((0.1, 0.4, 0.4, 0.7), grid=201) == pytest.approx(sampled, abs=0.005)


def test_evaluate_toy_end_to_end(toy_pipe, classifier, tmp_path):
    sheet = str(tmp_path / "sheet.png")
    report = evaluate_toy(
        toy_pipe, n_cases=4, seed=1, steps=2, classifier=classifier, batch_size=4, sheet=sheet
    )
    metrics = report["metrics"]
    assert set(metrics) == {"model", "text_only", "target", "chance"}
    for system, values in metrics.items():
        assert set(values) == set(METRICS)
        for key, value in values.items():
            if not (system == "chance" and key == "present"):
                assert -1.0 <= value <= 1.0, (system, key)
    assert metrics["chance"]["colour"] == 1 / len(WORLD.colours)
    assert metrics["target"]["background"] == 1.0
    assert len(report["by_kind"]) == 5 and len(report["cases"]) == 4  # + boxes exchanged
    assert len(report["exchanged"]) == 1 and metrics["target"]["obedience"] == 1.0
    first = report["cases"][0]
    assert first["prompt"].endswith("background") and len(first["model"]["subjects"]) == 1
    json.dumps(report)
    with Image.open(sheet) as im:
        assert im.width > 4 * 64 and im.height > 4 * 64


def test_two_subject_cases_differ_in_every_attribute():
    cases = make_cases(WORLD, 40, seed=5)
    assert {c.kind for c in cases} == {
        "one subject, box",
        "one subject, auto",
        "two subjects, box",
        "two subjects, auto",
    }
    for case in cases:
        for attrs in case.subjects:
            assert (attrs["shape"], attrs["colour"], attrs["pattern"]) in WORLD.heldout_combos
        if len(case.subjects) == 2:
            a, b = case.subjects
            assert all(a[k] != b[k] for k in ("shape", "colour", "pattern"))
            if case.boxes:
                assert box_iou(*case.boxes) == 0.0
    assert make_cases(WORLD, 40, seed=5) == cases


def eval_toy_args(*argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["eval", "toy", *argv])


@pytest.mark.parametrize(
    "argv",
    [
        ["--cases", "0"],
        ["--steps", "0"],
        ["--text-scale", "-1"],
        ["--checkpoint", "/nonexistent/model"],
        ["--classifier", "/nonexistent/classifier"],
        ["--out", "/nonexistent/dir/results.json"],
        ["--sheet", "/nonexistent/dir/sheet.png"],
        ["--train-classifier", "/nonexistent/dir/clf"],
        ["--train-classifier", "{tmp}/clf", "--classifier-steps", "0"],
    ],
)
def test_cli_rejects_bad_input(argv, toy_pipe, tmp_path):
    folder = str(tmp_path / "pipe")
    save_pipeline(toy_pipe, folder)
    args = eval_toy_args("--checkpoint", folder, *(a.format(tmp=tmp_path) for a in argv))
    with pytest.raises(UserError):
        args.run(args)


def test_cli_writes_table_json_and_sheet(toy_pipe, tmp_path, capsys):
    folder, out, sheet = (str(tmp_path / n) for n in ("pipe", "r.json", "s.png"))
    save_pipeline(toy_pipe, folder)
    args = eval_toy_args(
        "--checkpoint", folder, "--cases", "4", "--seed", "1", "--steps", "2",
        "--batch-size", "4", "--out", out, "--sheet", sheet,
    )  # fmt: skip
    assert args.run(args) == 0
    table = capsys.readouterr().out
    assert "| metric | model | text-only | chance | target render |" in table
    assert "| layout IoU |" in table
    with open(out) as f:
        assert set(json.load(f)["metrics"]) == {"model", "text_only", "target", "chance"}
    assert os.path.isfile(sheet)


def test_sdjax_eval_toy_exit_status(tmp_path, capsys):
    from sdjax.cli import main

    assert main(["eval", "toy", "--cases", "0", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_demo_draws_every_kind_of_case(toy_pipe, tmp_path, capsys):
    from sdjax.cli import main

    folder, out = str(tmp_path / "pipe"), str(tmp_path / "demo")
    save_pipeline(toy_pipe, folder)
    argv = ["demo", "--checkpoint", folder, "--cases", "4", "--steps", "2", "--out", out]
    assert main(argv) == 0
    with open(os.path.join(out, "demo.json")) as f:
        made = json.load(f)
    assert {c["kind"] for c in made["cases"]} == {
        "one subject, box", "one subject, auto", "two subjects, box", "two subjects, auto",
    }  # fmt: skip
    assert all(len(c["boxes"]) == len(c["subjects"]) for c in made["cases"])
    with Image.open(os.path.join(out, "demo.png")) as sheet:
        assert sheet.height > 4 * 128  # a row per case
    assert "wrote" in capsys.readouterr().out
    assert main([*argv[:-1], os.path.join(out, "demo.json")]) == 2  # --out is a file


def test_embedded_model_personalises_held_out_subjects(classifier):
    """The shipped model (sdjax/assets/default_model) on 16 held-out cases: colour,
    pattern and toy-CLIP similarity come from the references, far above text only; shapes
    are drawn (chance 0.125); with two boxes exchanged, each subject follows its own box
    (chance 0.125)."""
    from sdjax.pipeline import load_pipeline

    pipeline = load_pipeline()
    assert pipeline.config.resolution == R and pipeline.config.max_subjects == 3
    report = evaluate_toy(pipeline, n_cases=16, classifier=classifier, progress=False)
    model, text_only = report["metrics"]["model"], report["metrics"]["text_only"]
    assert model["colour"] >= text_only["colour"] + 0.25
    assert model["pattern"] > text_only["pattern"]
    assert model["clip_i"] > text_only["clip_i"] + 0.05
    assert model["present"] > text_only["present"]
    assert model["shape"] >= 0.4
    assert model["obedience"] >= 0.6
