"""Inputs as people really give them (issue 18): every bad one is one line `error: ...` with
exit status 2 and no file left behind, or a `warning: ...` where the run goes on; cut-outs,
rotated phone photos, per-subject options and the --subjects file read as meant."""

import json
import os
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

import sdjax
from sdjax.cli import main
from sdjax.config import load_config
from sdjax.convert.files import CheckpointError
from sdjax.errors import InputWarning, UserError
from sdjax.pipeline import load_pipeline, save_pipeline
from sdjax.sampling import prepare_inputs
from sdjax.train.tasks.records import prepare_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = "2"


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 30x20 reference with a red subject on white, and its mask."""
    root = tmp_path_factory.mktemp("photo")
    image = np.full((20, 30, 3), 255, np.uint8)
    image[5:15, 10:20] = [200, 30, 30]
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 10:20] = 255
    Image.fromarray(image).save(root / "star.png")
    Image.fromarray(mask).save(root / "star_mask.png")
    return str(root / "star.png"), str(root / "star_mask.png")


def cli(*argv) -> int:
    """`sdjax ARGV`'s exit status (argparse's errors raise SystemExit(2))."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit:
        return exit.code


def one_error(capsys, *words) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    return err[0]


def sample(folder, out, *argv):
    return cli("sample", "--checkpoint", folder, "--out", out, "--steps", STEPS, *argv)


def leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(".") or n.endswith(".tmp"))


# ---- Tracebacks before -------------------------------------------------------------------


def test_out_naming_a_folder_is_refused_before_any_work(photo, tmp_path, capsys):
    out = tmp_path / "x.png"
    out.mkdir()
    # The checkpoint does not exist either: the output is checked first, before any model.
    code = cli("sample", "--prompt", "a star", "--subject", photo[0], "--label", "star",
               "--checkpoint", "/nonexistent", "--out", out)  # fmt: skip
    assert code == 2
    one_error(capsys, "is a folder")
    assert out.is_dir() and os.listdir(out) == [] and leftovers(tmp_path) == []


def test_out_in_a_missing_folder_is_refused_before_any_work(photo, tmp_path, capsys):
    code = cli("sample", "--prompt", "a star", "--subject", photo[0], "--label", "star",
               "--checkpoint", "/nonexistent", "--out", tmp_path / "no" / "x.png")  # fmt: skip
    assert code == 2
    one_error(capsys, "output folder does not exist")


def test_export_to_an_existing_file(folder, tmp_path, capsys):
    target = tmp_path / "out"
    target.write_text("not a folder")
    assert cli("export", folder, target, "--format", "sdjax") == 2
    one_error(capsys, "is a file")
    assert target.read_text() == "not a folder"


def test_export_of_an_unreadable_model_leaves_no_folder(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text("{}")
    assert cli("export", broken, tmp_path / "out", "--format", "sdjax") == 2
    one_error(capsys)
    assert sorted(os.listdir(tmp_path)) == ["broken"]


@pytest.mark.parametrize("name", ["README.md", "pyproject.toml"])
def test_train_config_that_is_not_python(name, tmp_path, capsys):
    code = cli("train", "--config", os.path.join(ROOT, name), "--workdir", tmp_path / "w")
    assert code == 2
    one_error(capsys, "not a Python file")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "entry, words",
    [
        ({"image": "star.png", "label": "star", "box": ["a", 0, 1, 1]}, ["subject 1", "'a'"]),
        ({"image": "star.png", "label": "star", "mask": 7}, ["subject 1", "'mask'", "string"]),
        (
            {"image": "star.png", "label": "star", "box": "0.1,0.2,0.5,0.6"},
            ["'box'", "list of 4 numbers"],
        ),
        ({"image": "star.png", "label": "star", "box": [0.1, 0.2, 0.5]}, ["'box'", "4 numbers"]),
        ({"image": "star.png", "lable": "star"}, ["unknown key 'lable'"]),
        ({"image": "star.png"}, ["needs 'label'"]),
        ({"image": 3, "label": "star"}, ["'image'", "string"]),
        ({"image": "star.png", "label": ""}, ["'label'"]),
        ("star.png", ["must be a JSON object"]),
    ],
)
def test_subjects_file_is_checked_field_by_field(entry, words, folder, photo, tmp_path, capsys):
    spec = os.path.join(os.path.dirname(photo[0]), f"spec_{abs(hash(str(entry)))}.json")
    with open(spec, "w") as f:
        json.dump([entry], f)
    out = tmp_path / "out.png"
    assert sample(folder, out, "--prompt", "a star", "--subjects", spec) == 2
    one_error(capsys, spec, *words)
    assert not out.exists() and leftovers(tmp_path) == []


def test_subjects_file_that_is_not_a_list(folder, tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text('{"image": "a.png", "label": "star"}')
    assert sample(folder, tmp_path / "out.png", "--prompt", "a star", "--subjects", spec) == 2
    one_error(capsys, "JSON list")


def huge_png(path, side=14_000):
    """A PNG whose header says side x side pixels (196 megapixels); PIL reads the header."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header))
        f.write(chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def test_a_196_megapixel_image(folder, tmp_path, capsys):
    huge_png(tmp_path / "huge.png")
    code = sample(folder, tmp_path / "out.png", "--prompt", "a star",
                  "--subject", tmp_path / "huge.png", "--label", "star")  # fmt: skip
    assert code == 2
    one_error(capsys, "huge.png", "too large", "megapixels")
    assert not (tmp_path / "out.png").exists()


# ---- Exit 0 with a wrong result before --------------------------------------------------


@pytest.mark.parametrize("flag", ["--text-scale", "--image-scale"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_guidance(flag, value, folder, photo, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = sample(folder, out, "--prompt", "a star", "--subject", photo[0], "--label", "star",
                  f"{flag}={value}")  # fmt: skip
    assert code == 2
    one_error(capsys, "finite")
    assert not out.exists()


def test_non_finite_guidance_from_python(pipe):
    with pytest.raises(UserError, match="finite"):
        sdjax.sample(pipe, "a star", [], num_steps=2, text_scale=float("nan"))


def test_weights_overwritten_with_nan_are_refused_at_load(pipe, photo, tmp_path, capsys):
    damaged = str(tmp_path / "damaged")
    save_pipeline(pipe, damaged)
    weights = os.path.join(damaged, "params.safetensors")
    tensors = load_file(weights)
    name = sorted(tensors)[3]
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_pipeline(damaged)
    out = tmp_path / "out.png"
    code = sample(damaged, out, "--prompt", "a star", "--subject", photo[0], "--label", "star")
    assert code == 2
    one_error(capsys, name, "NaN")
    assert not out.exists()


def test_an_rgba_cut_outs_alpha_is_its_mask(pipe):
    rgb = np.full((20, 30, 3), 255, np.uint8)
    rgb[5:15, 10:20] = [200, 30, 30]
    hidden = rgb.copy()
    hidden[rgb[..., 1] == 255] = [0, 255, 0]  # colour under the transparent pixels
    alpha = np.where(rgb[..., 1] == 255, 0, 255).astype(np.uint8)
    cut_out = Image.fromarray(np.dstack([hidden, alpha]), "RGBA")
    with_mask = sdjax.Subject(rgb, "star", mask=alpha)
    for image in (cut_out, np.dstack([hidden, alpha])):
        refs = prepare_inputs(pipe, "a star", [sdjax.Subject(image, "star")])["refs"]
        np.testing.assert_array_equal(refs, prepare_inputs(pipe, "a star", [with_mask])["refs"])


def test_an_rgba_cut_out_file_from_the_command_line(folder, tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 1] = 255  # green, fully transparent
    rgba[5:15, 10:20] = [200, 30, 30, 255]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    out = tmp_path / "out.png"
    code = sample(folder, out, "--prompt", "a red star", "--subject", tmp_path / "cut.png",
                  "--label", "star")  # fmt: skip
    assert code == 0 and out.is_file()


def rotated_jpeg(path):
    """A 40x20 JPEG stored sideways with EXIF orientation 6: it displays as 20x40, the
    subject in the top half. Returns the image as displayed."""
    shown = np.full((40, 20, 3), 255, np.uint8)
    shown[4:16, 4:16] = [200, 30, 30]
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored.save(path, exif=exif, quality=100)
    with Image.open(path) as im:
        assert im.size == (40, 20)
    return shown


def test_exif_orientation_is_applied_to_images_and_masks(pipe, tmp_path):
    rotated_jpeg(tmp_path / "phone.jpg")
    drawn = np.zeros((40, 20), np.uint8)  # the mask, drawn on the photo as it displays
    drawn[4:16, 4:16] = 255
    Image.fromarray(drawn).save(tmp_path / "mask.png")
    subject = sdjax.Subject(str(tmp_path / "phone.jpg"), "star", mask=str(tmp_path / "mask.png"))
    inputs = prepare_inputs(pipe, "a star", [subject])  # was: "mask is 20x40 but ... 40x20"
    with Image.open(tmp_path / "phone.jpg") as im:
        upright = np.asarray(im.transpose(Image.Transpose.ROTATE_270))
    same = prepare_inputs(pipe, "a star", [sdjax.Subject(upright, "star", mask=drawn)])
    np.testing.assert_array_equal(inputs["refs"], same["refs"])
    # A mask file with its own EXIF rotation is turned the same way.
    Image.fromarray(drawn).transpose(Image.Transpose.ROTATE_90).save(
        tmp_path / "mask.jpg", exif=rotated_exif(), quality=100
    )
    subject.mask = str(tmp_path / "mask.jpg")
    assert prepare_inputs(pipe, "a star", [subject])["refs"].shape == inputs["refs"].shape


def rotated_exif():
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif


def test_unknown_words_are_one_warning_listing_each_once(folder, photo, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = sample(folder, out, "--prompt", "a dog on the beach with a dog",
                  "--subject", photo[0], "--label", "dog")  # fmt: skip
    assert code == 0 and out.is_file()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert "dog, with, beach" in warnings[0] or "dog, beach, with" in warnings[0]
    assert warnings[0].count("dog") == 1


def test_strict_makes_unknown_words_an_error(folder, photo, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = sample(folder, out, "--prompt", "a dog on the beach", "--subject", photo[0],
                  "--label", "dog", "--strict")  # fmt: skip
    assert code == 2
    one_error(capsys, "dog, beach")
    assert not out.exists()


def test_a_prompt_cut_to_fit_is_a_warning(pipe):
    long = "a red star and " * 8 + "a blue ring on white background"
    with pytest.warns(InputWarning, match="white background' at its end is dropped"):
        sdjax.sample(pipe, long, [sdjax.Subject(np.full((8, 8, 3), 200, np.uint8), "star")],
                     num_steps=2)  # fmt: skip
    with pytest.raises(UserError, match="dropped"):
        sdjax.sample(pipe, long, [], num_steps=2, strict=True)


def test_the_embedded_models_warning_names_the_words_it_knows():
    from sdjax.sampling import prompt_problems

    (problem,) = prompt_problems(load_pipeline(), "a dog on the beach", [])
    assert "dog, beach" in problem and "it knows only the toy world's words" in problem
    assert "star" in problem and "checkered" in problem


def test_the_documented_example_prompts_use_words_the_embedded_model_knows(capsys):
    """`sdjax sample --help` and the package docstring show prompts a new user copies (the
    help's was 'a dog on the beach', two words the embedded model does not know)."""
    from sdjax.sampling import prompt_problems

    assert cli("sample", "--help") == 0
    help_text = " ".join(capsys.readouterr().out.split())
    examples = re.findall(r"e\.g\. '([^']+)'", help_text)
    examples += re.findall(r'sdjax\.sample\(pipe, "([^"]+)"', sdjax.__doc__)
    assert len(examples) == 2, examples
    pipeline = load_pipeline()
    for prompt in examples:
        assert prompt_problems(pipeline, prompt, []) == [], prompt


def test_a_mistyped_data_path_is_an_error_not_a_new_toy_world(tmp_path):
    typo = tmp_path / "toy_dat"
    sets = [f"data.path={typo}", "data.toy_n=8"]  # 8: a quick failure under the old code
    config = load_config(os.path.join(ROOT, "configs", "toy.py"), sets)
    with pytest.raises(UserError, match="no record folder at data.path"):
        prepare_data(config, str(tmp_path / "work"))
    assert not typo.exists()


# ---- Confusing before -------------------------------------------------------------------


def test_mask_and_box_bind_to_the_subject_they_follow(folder, photo, tmp_path, capsys):
    # Subject 1 is 16x16 without a mask; only subject 2 (30x20) has one, and a box.
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "grey.png")
    out = tmp_path / "out.png"
    code = sample(folder, out, "--prompt", "a square and a star",
                  "--subject", tmp_path / "grey.png", "--label", "square",
                  "--subject", photo[0], "--label", "star", "--mask", photo[1],
                  "--box", "0.5,0.1,0.9,0.6")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as im:
        described = json.loads(im.text["subjects"])
    assert described[0]["mask"] is None and described[0]["box"] is None
    assert described[1]["mask"] == photo[1] and described[1]["box"] == [0.5, 0.1, 0.9, 0.6]


def test_a_mask_of_the_wrong_size_names_its_subject(folder, photo, tmp_path, capsys):
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "grey.png")
    code = sample(folder, tmp_path / "out.png", "--prompt", "a square and a star",
                  "--subject", photo[0], "--label", "star",
                  "--subject", tmp_path / "grey.png", "--label", "square",
                  "--mask", photo[1])  # fmt: skip
    assert code == 2
    one_error(capsys, "subject 2 mask is 30x20 but its image is 16x16")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--mask", "{mask}", "--subject", "{image}", "--label", "star"], ["before any --subject"]),
        (["--subject", "{image}", "--label", "a", "--label", "b"], ["subject 1", "--label twice"]),
        (["--subject", "{image}"], ["subject 1", "no --label"]),
        (["--subject", "{image}", "--label", "star", "--box", "0.1,0.2,0.5"], ["4 numbers"]),
        (["--subject", "{image}", "--label", "star", "--box", "a,b,c,d"], ["not four numbers"]),
    ],
)
def test_per_subject_options_out_of_place(argv, words, folder, photo, tmp_path, capsys):
    argv = [a.format(image=photo[0], mask=photo[1]) for a in argv]
    assert sample(folder, tmp_path / "out.png", "--prompt", "a star", *argv) == 2
    one_error(capsys, *words)


def test_a_box_with_spaces_is_read(folder, photo, tmp_path):
    out = tmp_path / "out.png"
    code = sample(folder, out, "--prompt", "a star", "--subject", photo[0], "--label", "star",
                  "--box", "0.1 0.2 0.5 0.6")  # fmt: skip
    assert code == 0 and out.is_file()


def test_steps_beyond_the_schedule_are_worded_for_the_user(folder, photo, tmp_path, capsys):
    code = cli("sample", "--checkpoint", folder, "--out", tmp_path / "out.png",
               "--prompt", "a star", "--subject", photo[0], "--label", "star",
               "--steps", "100000")  # fmt: skip
    assert code == 2
    line = one_error(capsys, "steps must be in 1..1000", "100000")
    assert "num_steps=" not in line


def test_subjects_file_schema_is_in_help_and_readme(capsys):
    from sdjax.subjects import SPEC_FORMAT

    assert cli("sample", "--help") == 0
    help_text = capsys.readouterr().out
    assert SPEC_FORMAT in help_text
    with open(os.path.join(ROOT, "README.md")) as f:
        assert SPEC_FORMAT in f.read()


def test_output_size_of_the_embedded_model_is_stated(capsys):
    with open(os.path.join(ROOT, "sdjax", "assets", "default_model", "model.json")) as f:
        size = json.load(f)["config"]["resolution"]
    assert cli("sample", "--help") == 0
    assert f"{size}x{size} px" in " ".join(capsys.readouterr().out.split())
    with open(os.path.join(ROOT, "README.md")) as f:
        assert f"{size}x{size} px" in f.read()


def test_subjects_file_relative_paths_and_full_entry(folder, photo, tmp_path):
    spec = os.path.join(os.path.dirname(photo[0]), "good.json")
    with open(spec, "w") as f:
        json.dump([{"image": "star.png", "label": "star", "mask": "star_mask.png",
                    "box": [0.1, 0.2, 0.5, 0.6]}], f)  # fmt: skip
    out = tmp_path / "out.png"
    assert sample(folder, out, "--prompt", "a star", "--subjects", spec) == 0
