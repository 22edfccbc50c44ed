"""The toy world: deterministic scenes, a clean held-out split, exact masks, honest captions."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from sdjax.cli import _Parser
from sdjax.data import toy
from sdjax.data.cli import add_parser
from sdjax.data.records import image_array, mask_array
from sdjax.data.shards import MANIFEST, RecordSource
from sdjax.errors import UserError

WORLD = toy.ToyWorld()


@pytest.fixture(scope="module")
def train_scenes():
    return list(toy.generate(WORLD, 160, seed=3))


@pytest.fixture(scope="module")
def heldout_scenes():
    return list(toy.generate(WORLD, 60, seed=3, split="heldout"))


def _triple(subject):
    return tuple(subject.attributes[k] for k in ("shape", "colour", "pattern"))


def test_scenes_are_deterministic():
    first = [toy.make_scene(WORLD, i, seed=7).encode() for i in range(4)]
    assert first == [toy.make_scene(WORLD, i, seed=7).encode() for i in range(4)]
    assert toy.encoded_scenes(WORLD, 7, "train", (2, 4)) == first[2:]
    assert all(
        a != b for a, b in zip(first, [toy.make_scene(WORLD, i, seed=8).encode() for i in range(4)])
    )
    assert len(set(first)) == 4
    heldout = toy.make_scene(WORLD, 0, seed=7, split="heldout")
    assert heldout.encode() != first[0] and heldout.source_id == "toy/heldout/7/0"


def test_heldout_combinations_partition_the_family():
    every = len(WORLD.shapes) * len(WORLD.colours) * len(WORLD.patterns)
    train, heldout = set(WORLD.combos("train")), set(WORLD.combos("heldout"))
    assert not train & heldout and len(train) + len(heldout) == every
    assert 0.10 <= len(heldout) / every <= 0.15
    assert heldout == WORLD.heldout_combos == toy.ToyWorld().heldout_combos  # fixed choice
    for k, vocabulary in enumerate((WORLD.shapes, WORLD.colours, WORLD.patterns)):
        assert {t[k] for t in train} == set(vocabulary)  # every value still trains
        assert {t[k] for t in heldout} == set(vocabulary)  # and is tested in new company
    with pytest.raises(UserError, match="split"):
        WORLD.combos("test")


def test_splits_draw_only_their_combinations(train_scenes, heldout_scenes):
    train_seen = {_triple(s) for r in train_scenes for s in r.subjects}
    heldout_seen = {_triple(s) for r in heldout_scenes for s in r.subjects}
    assert not train_seen & WORLD.heldout_combos
    assert heldout_seen <= WORLD.heldout_combos
    assert len(heldout_seen) > len(WORLD.heldout_combos) // 2  # it really draws from them


def test_masks_and_boxes_agree(train_scenes):
    counts = set()
    for record in train_scenes:
        assert record.width == record.height == WORLD.size
        assert image_array(record).shape == (WORLD.size, WORLD.size, 3)
        counts.add(len(record.subjects))
        union = np.zeros((WORLD.size, WORLD.size), int)
        for subject in record.subjects:
            mask = mask_array(subject)
            assert mask.shape == (WORLD.size, WORLD.size) and mask.any()
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            expected = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            assert np.abs(np.subtract(subject.box, expected)).max() <= 1
            assert subject.label == subject.attributes["shape"] and subject.score == 1.0
            assert set(subject.attributes) == {"shape", "colour", "pattern", "size"}
            union += mask
        assert union.max() == 1  # visible masks never overlap
        assert len({s.label for s in record.subjects}) == len(record.subjects)
    assert counts == {1, 2, 3}


def test_solid_subjects_show_their_palette_colour(train_scenes):
    checked = 0
    for record in train_scenes:
        image = image_array(record).astype(int)
        for subject in record.subjects:
            # Two pixels in from any edge, an occluder's anti-aliasing no longer reaches.
            core = ndimage.binary_erosion(mask_array(subject), np.ones((3, 3)), iterations=2)
            if subject.attributes["pattern"] == "solid" and core.any():
                colour = toy.PALETTE[subject.attributes["colour"]]
                assert np.abs(image[core] - colour).max() <= 1
                checked += 1
    assert checked > 20


def test_caption_names_every_subject_and_the_background(train_scenes):
    for record in train_scenes:
        words = record.caption.replace(",", "").split()
        assert record.caption.endswith(f"on a {record.attributes['background']} background")
        for subject in record.subjects:
            a = subject.attributes
            phrase = f"{a['colour']} {a['pattern']} {a['shape']}"
            assert phrase in record.caption and a["shape"] in words
    assert toy.caption(
        [{"colour": "red", "pattern": "striped", "shape": "star"}] * 2
        + [{"colour": "orange", "pattern": "solid", "shape": "ring"}],
        "gray",
    ) == ("a red striped star, a red striped star and an orange solid ring on a gray background")


def test_render_subject_is_centred_and_exact():
    image, mask = toy.render_subject(WORLD, "heart", "blue", "solid", "large", "white")
    assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
    centre = ndimage.center_of_mass(mask)
    assert abs(centre[0] - 31.5) < 3 and abs(centre[1] - 31.5) < 1
    assert (image[~ndimage.binary_dilation(mask)] == toy.PALETTE["white"]).all()
    assert (image[ndimage.binary_erosion(mask)] == toy.PALETTE["blue"]).all()
    small = toy.render_subject(WORLD, "heart", "blue", "solid", "small", "white")[1]
    assert 0.2 < small.sum() / mask.sum() < 0.5
    with pytest.raises(UserError, match="shape"):
        toy.render_subject(WORLD, "blob", "blue", "solid")


def test_world_rejects_unknown_vocabulary():
    with pytest.raises(UserError, match="unknown shape"):
        toy.ToyWorld(shapes=("circle", "blob"))
    with pytest.raises(UserError, match="background"):
        toy.ToyWorld(backgrounds=("white", "red"))


def _data_cli(*argv):
    parser = _Parser(prog="sdjax")
    add_parser(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    args = parser.parse_args(["data", *argv])
    return args.run(args)


def test_cli_toy_writes_shards_manifest_and_sheet(tmp_path, capsys):
    out = tmp_path / "toy"
    args = ["--n", "70", "--out", str(out), "--seed", "5", "--records-per-shard", "30"]
    assert _data_cli("toy", *args, "--workers", "1") == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("wrote 70 train scenes")
    names = sorted(os.listdir(out))
    assert names == ["contact_sheet.png", MANIFEST] + [
        f"shard-0000{i}.array_record" for i in range(3)
    ]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["count"] == 70 and [s["count"] for s in manifest["shards"]] == [30, 30, 10]
    assert manifest["provenance"]["generator"] == "toy" and manifest["provenance"]["seed"] == 5
    source = RecordSource(str(out))
    assert source[69].encode() == toy.make_scene(WORLD, 69, seed=5).encode()
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 1000 and sheet.height > 400

    with pytest.raises(UserError, match="not empty"):
        _data_cli("toy", *args, "--workers", "1")
    # Two worker processes (70 scenes make two tasks) write the very same shards.
    shard_bytes = [(out / s["file"]).read_bytes() for s in manifest["shards"]]
    assert _data_cli("toy", *args, "--workers", "2", "--overwrite") == 0
    assert [(out / s["file"]).read_bytes() for s in manifest["shards"]] == shard_bytes


def test_cli_info_and_sheet(tmp_path, capsys):
    out = tmp_path / "toy"
    _data_cli("toy", "--n", "6", "--out", str(out), "--split", "heldout", "--workers", "1")
    capsys.readouterr()
    assert _data_cli("info", str(out), "--verify") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{out}: 6 records, schema 1, 1 shards")
    assert '"split": "heldout"' in lines[1] and lines[2] == "verified: 6 intact, 0 corrupt"
    assert _data_cli("sheet", str(out), "--out", str(tmp_path / "s.png"), "--n", "4") == 0
    with Image.open(tmp_path / "s.png") as sheet:
        assert sheet.size[0] > 600


def test_cli_bad_input(tmp_path):
    with pytest.raises(UserError, match="--n"):
        _data_cli("toy", "--n", "0", "--out", str(tmp_path / "a"))
    with pytest.raises(UserError, match="manifest"):
        _data_cli("info", str(tmp_path))
    with pytest.raises(UserError, match="png"):
        _data_cli("sheet", str(tmp_path), "--out", str(tmp_path / "s.jpg"))
    with pytest.raises(SystemExit) as exit_:
        _data_cli("toy", "--n", "3", "--out", str(tmp_path), "--split", "test")
    assert exit_.value.code == 2
