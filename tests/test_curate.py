"""The curation pipeline with stand-in stages: per-image logic, filters, resuming, nouns, CLI.

The stand-ins find coloured rectangles; the same stages under Beam are in test_beam_curate.py.
"""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from sdjax.cli import main
from sdjax.data import curation as C
from sdjax.data.curation import output
from sdjax.data.curation.output import WORK
from sdjax.data.nouns import caption_nouns
from sdjax.data.records import encode_image, mask_array
from sdjax.data.shards import MANIFEST, RecordSource
from sdjax.errors import UserError

SIDE = 64
COLOURS = {"box": (220, 30, 30), "ball": (30, 30, 220), "mat": (30, 200, 30)}
SCORES = {"box": 0.9, "ball": 0.7, "mat": 0.5}
CAPTION = "a red box and a blue ball on a green mat"
CONFIG = C.CurationConfig(chunk_size=4, batch_size=3, min_short_side=32)


def _scene(i: int) -> bytes:
    """Item i: 16 px (too small) when i % 5 == 4, junk when i % 7 == 3, else a scene with
    a red box, and unless i % 6 == 5 a blue ball and a green mat, placed by i."""
    if i % 7 == 3:
        return b"not an image"
    side = 16 if i % 5 == 4 else SIDE
    image = np.full((side, side, 3), 120, np.uint8)
    image[2 + i % 5 : 26, 4:30] = COLOURS["box"]
    if i % 6 != 5:
        image[34:60, 30 + i % 3 : 58] = COLOURS["ball"]
        image[36:50, 2:20] = COLOURS["mat"]  # area 252 of 4096: too small to keep
    return encode_image(image, "PNG")


class FakeStages:
    """Colour-finding stand-ins that count their calls (and can fail on purpose)."""

    def __init__(self, fail_at: int | None = None):
        self.captioned, self.detected, self.fail_at = [], 0, fail_at

    def captioner(self, images):
        self.captioned += [np.asarray(image).sum() for image in images]
        return [CAPTION] * len(images)

    def detector(self, images, nouns):
        return [self.detect(image, words) for image, words in zip(images, nouns, strict=True)]

    def detect(self, image, nouns):
        self.detected += 1
        if self.detected == self.fail_at:
            raise RuntimeError("simulated crash")
        pixels = np.asarray(image)
        boxes, scores, labels = [], [], []
        for noun in nouns:
            ys, xs = np.nonzero(np.all(pixels == COLOURS[noun], axis=-1))
            if len(xs):
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                scores.append(SCORES[noun])
                labels.append(noun)
        return C.Detections(np.asarray(boxes, float).reshape(-1, 4), np.asarray(scores), labels)

    def segmenter(self, images, boxes):
        return [self.segment(image, b) for image, b in zip(images, boxes, strict=True)]

    @staticmethod
    def segment(image, boxes):
        coloured = np.asarray(image).std(axis=-1) > 10  # everything but the gray background
        masks = np.zeros((len(boxes), *coloured.shape), bool)
        for mask, (x1, y1, x2, y2) in zip(masks, np.asarray(boxes, int)):
            mask[y1:y2, x1:x2] = coloured[y1:y2, x1:x2]
        return masks

    def stages(self) -> C.Stages:
        return C.Stages(captioner=self.captioner, detector=self.detector, segmenter=self.segmenter)


ITEMS = [(f"img/{i:02d}.png", _scene(i)) for i in range(14)]


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    out = tmp_path_factory.mktemp("curated") / "out"
    report = C.curate(ITEMS, FakeStages().stages(), str(out), CONFIG)
    return out, report


def test_curation_keeps_scenes_with_two_good_subjects(curated):
    out, report = curated
    # 14 items: junk 3 and 10; too small 4 and 9; only one subject 5 and 11.
    assert report.as_dict() == {
        "images_seen": 14,
        "images_kept": 8,
        "subjects_kept": 16,
        "dropped_images": {"detection_count": 2, "short_side": 2, "unreadable": 2},
        "dropped_subjects": {"area_ratio": 8},  # the mats
    }
    source = RecordSource(str(out))
    records = [source[i] for i in range(len(source))]
    assert [r.source_id for r in records] == [
        f"img/{i:02d}.png" for i in (0, 1, 2, 6, 7, 8, 12, 13)
    ]
    assert not os.path.exists(out / WORK)
    # one shard per block of 4 input images, records in input order
    assert sorted(f for f in os.listdir(out) if f.startswith("shard-")) == [
        f"shard-00000-{k:05d}.array_record" for k in range(4)
    ]
    assert json.loads((out / "report.json").read_text()) == report.as_dict()
    for record in records:
        i = int(record.source_id[4:6])
        assert record.image == ITEMS[i][1] and record.caption == CAPTION
        assert record.attributes == {"nouns": "box,ball,mat"}
        box, ball = record.subjects
        assert (box.label, box.score, ball.label, ball.score) == ("box", 0.9, "ball", 0.7)
        assert box.box == (4, 2 + i % 5, 30, 26) and ball.box == (30 + i % 3, 34, 58, 60)
        pixels = np.asarray(Image.open(io.BytesIO(record.image)))
        for subject in (box, ball):
            colour = np.all(pixels == COLOURS[subject.label], axis=-1)
            assert np.array_equal(mask_array(subject), colour)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["provenance"]["report"] == report.as_dict()
    assert manifest["provenance"]["config"]["chunk_size"] == 4


def test_curation_resumes_after_a_crash(curated, tmp_path):
    out = tmp_path / "out"
    crashing = FakeStages(fail_at=7)  # block 2's first detection (blocks 0 and 1 make 6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        C.curate(ITEMS, crashing.stages(), str(out), CONFIG)
    work = out / WORK
    assert sorted(os.listdir(work / "blocks")) == ["00000-00000.json", "00000-00001.json"]
    shards = ["shard-00000-00000.array_record", "shard-00000-00001.array_record"]
    assert sorted(f for f in os.listdir(out) if f.startswith("shard-")) == shards
    assert not (out / MANIFEST).exists() and not (out / "report.json").exists()
    for config in (C.CurationConfig(chunk_size=5), CONFIG):  # other settings, other input
        with pytest.raises(UserError, match="unfinished curation of other input or settings"):
            C.curate(
                ITEMS[:: 1 if config is not CONFIG else -1], FakeStages().stages(), str(out), config
            )

    resumed = FakeStages()
    report = C.curate(ITEMS, resumed.stages(), str(out), CONFIG)
    # Only blocks 2 and 3 ran again: items 8..13 less junk 10 and the small 9.
    assert len(resumed.captioned) == 4 and resumed.detected == 4
    reference_out, reference = curated
    assert report == reference
    for name in [*shards, "shard-00000-00002.array_record", MANIFEST, "report.json"]:
        assert (out / name).read_bytes() == (reference_out / name).read_bytes(), name
    with pytest.raises(UserError, match="not empty"):
        C.curate(ITEMS, resumed.stages(), str(out), CONFIG)


def test_a_damaged_shard_is_never_listed(curated, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        C.curate(ITEMS, FakeStages(fail_at=7).stages(), str(out), CONFIG)
    shard = out / "shard-00000-00000.array_record"
    shard.write_bytes(shard.read_bytes()[:-10])  # damaged after its block was reported
    blocks = out / WORK / "blocks"
    results = [json.loads(path.read_text()) for path in sorted(blocks.iterdir())]
    with pytest.raises(UserError, match="not whole"):
        output.finish(str(out), results, {})
    assert not (out / MANIFEST).exists()
    # the rerun takes the damaged shard's block as unfinished: blocks 0, 2 and 3 run again
    resumed = FakeStages()
    C.curate(ITEMS, resumed.stages(), str(out), CONFIG)
    assert len(resumed.captioned) == 3 + 4
    reference_out, _ = curated
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference_out))
    for name in os.listdir(reference_out):
        assert (out / name).read_bytes() == (reference_out / name).read_bytes(), name


def test_nms_and_unlabelled_detections():
    class Doubled(FakeStages):
        def detect(self, image, nouns):
            found = super().detect(image, nouns)
            shifted = found.boxes + [1, 0, 1, 0]  # IoU with the original > 0.5
            return C.Detections(
                np.concatenate([found.boxes, shifted]),
                np.concatenate([found.scores, found.scores - 0.1]),
                found.labels + ["", *found.labels[1:]],
            )

    stages = Doubled().stages()
    image, data = C.stored_image(_scene(0))
    record, reasons = C.curate_image("x", image, data, CAPTION, stages, CONFIG)
    assert reasons == ["label", "nms", "nms", "area_ratio"]
    assert [s.label for s in record.subjects] == ["box", "ball"]
    unfiltered = C.CurationConfig(min_short_side=32, filters=None)
    record, reasons = C.curate_image("x", image, data, CAPTION, stages, unfiltered)
    assert reasons == ["label", "nms", "nms"] and len(record.subjects) == 3
    few_nouns = C.curate_image("x", image, data, "a red box", stages, CONFIG)
    assert few_nouns == (None, ["noun_count"])


def test_stored_image_shrinks_to_the_short_side():
    big = encode_image(np.zeros((900, 1200, 3), np.uint8), "PNG")
    image, data = C.stored_image(big, 800)
    assert image.size == (1067, 800) and Image.open(io.BytesIO(data)).format == "JPEG"
    small = encode_image(np.zeros((60, 50, 3), np.uint8), "PNG")
    assert C.stored_image(small, 800)[1] == small
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10)).save(buffer, format="WEBP")
    image, data = C.stored_image(buffer.getvalue())
    assert image.size == (20, 10) and Image.open(io.BytesIO(data)).format == "JPEG"


@pytest.mark.parametrize(
    "caption, nouns",
    [
        ("a man riding a horse on a beach", ["man", "horse", "beach"]),
        ("two dogs playing with a frisbee in the grass", ["dogs", "frisbee", "grass"]),
        ("a woman in a red dress holding an umbrella", ["woman", "dress", "umbrella"]),
        (
            "a plate of food with broccoli and rice on a table",
            ["plate", "food", "broccoli", "rice", "table"],
        ),
        ("a black and white photo of a cat sitting on a couch", ["cat", "couch"]),
        ("a red car parked in front of a building", ["car", "building"]),
        ("the dog is wearing a hat", ["dog", "hat"]),
        ("a large sleeping dog next to a fire hydrant", ["dog", "hydrant"]),
        ("a loaf of bread on a wooden table", ["loaf", "bread", "table"]),
        ("people walking down a street next to a bus", ["people", "street", "bus"]),
        ("a living room with a couch, a tv and a lamp", ["room", "couch", "tv", "lamp"]),
        ("3 apples and a banana on a plate", ["apples", "banana", "plate"]),
        ("a cat and a cat", ["cat"]),
        ("", []),
    ],
)
def test_caption_nouns(caption, nouns):
    assert caption_nouns(caption) == nouns


def test_cli_curate_bad_input_is_one_line(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "blip").mkdir()
    (tmp_path / "blip" / "config.json").write_text("{}")
    (tmp_path / "sam").mkdir()
    models = ["--captioner", str(tmp_path / "blip"), "--detector", str(tmp_path / "gd")]
    cases = [
        ([*models, "--segmenter", str(tmp_path / "blip")], "detector model folder"),
        (["--captioner", str(tmp_path / "sam"), "--detector", "x", "--segmenter", "x"], "config"),
        (
            [f"--{role}={tmp_path / 'blip'}" for role in ("captioner", "detector", "segmenter")],
            "no images",
        ),
    ]
    for argv, message in cases:
        assert main(["data", "curate", str(images), "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
