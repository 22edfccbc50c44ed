"""The training input pipeline: the batch contract, crops and augmentation, CFG drops,
determinism, exact resume, per-process slices, corrupt records, worker processes."""

import json

import ml_collections
import numpy as np
import pytest
from PIL import Image
from tiny import tiny_config

from sdjax.conditioning import box_pixels
from sdjax.data import toy
from sdjax.data.loader import LoaderConfig, _from_jsonable, _jsonable, make_loader
from sdjax.data.records import Record, Subject, encode_image, encode_mask, image_array
from sdjax.data.shapes import PATTERNS
from sdjax.data.shards import ShardWriter
from sdjax.data.transforms import (
    ExampleConfig,
    ExampleTransform,
    Geometry,
    augment_reference,
    cfg_drops,
    crop_window,
    perspective_coefficients,
    perspective_corners,
    resize_mask,
    training_caption,
)
from sdjax.errors import UserError
from sdjax.pipeline import make_tokenizer
from sdjax.tokenizer import PLACEHOLDER, Tokenizer

SCENES, SIDE, BATCH = 64, 32, 8
CONFIG = tiny_config()  # R = M = 16, N = 2, S = 16, L = 24
TOKENIZER = make_tokenizer(CONFIG)
NO_DROPS = {"p_text": 0.0, "p_both": 0.0, "p_mask": 0.0}
FULL_VOCAB = Tokenizer(max_length=77)
SHAPE_WORDS = set(toy.ToyWorld().shapes)


def _write_scenes(root, corrupt_index=None):
    world = toy.ToyWorld(size=SIDE)
    with ShardWriter(str(root), records_per_shard=SCENES // 2) as writer:
        for record in toy.generate(world, SCENES, seed=5):
            data = bytearray(record.encode())
            if record.source_id.endswith(f"/{corrupt_index}"):
                data[data.index(b"background") + 2] ^= 0x01  # one flipped caption byte
            writer.write_encoded(bytes(data))
    return str(root)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return _write_scenes(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="module")
def scene_index():
    """Output image bytes -> scene index: a square scene's crop is the whole image, so each
    example's image identifies its record."""
    index = {}
    for i, record in enumerate(toy.generate(toy.ToyWorld(size=SIDE), SCENES, seed=5)):
        small = Image.fromarray(image_array(record)).resize((16, 16), Image.BICUBIC)
        index[(np.asarray(small, np.float32) / 127.5 - 1.0).tobytes()] = i
    assert len(index) == SCENES
    return index


def _loader(path, seed=0, batch_size=BATCH, **options):
    keys = {"process_index", "process_count", "worker_count", "num_epochs"}
    loader_args = {k: options.pop(k) for k in keys & options.keys()}
    loader_args = {"process_index": 0, "process_count": 1, **loader_args}
    config = LoaderConfig.from_dict({"path": path, **options})
    return make_loader(config, CONFIG, TOKENIZER, batch_size=batch_size, seed=seed, **loader_args)


def _take(loader, n):
    with loader:
        return [next(loader) for _ in range(n)]


def _examples(loader):
    with loader:
        batches = list(loader)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_follow_the_contract(scenes):
    batches = _take(_loader(scenes), 4)
    batch = batches[0]
    n, r, s, length = CONFIG.max_subjects, CONFIG.resolution, CONFIG.image.image_size, 24
    expected = {
        "image": ((BATCH, r, r, 3), np.float32),
        "refs": ((BATCH, n, s, s, 3), np.float32),
        "boxes": ((BATCH, n, 4), np.float32),
        "valid": ((BATCH, n), np.bool_),
        "use_box": ((BATCH, n), np.bool_),
        "ids": ((BATCH, length), np.int32),
        "placeholders": ((BATCH, n), np.int32),
        "label_positions": ((BATCH, n), np.int32),
        "masks": ((BATCH, n, CONFIG.latent_size, CONFIG.latent_size), np.float32),
        "regions": ((BATCH, n, CONFIG.latent_size, CONFIG.latent_size), np.float32),
        "drop_text": ((BATCH,), np.bool_),
        "drop_loc": ((BATCH,), np.bool_),
        "drop_objs": ((BATCH,), np.bool_),
        "noise_seed": ((BATCH,), np.int32),
    }
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    assert -1.0 <= batch["image"].min() < 0.0 < batch["image"].max() <= 1.0
    batch = {k: np.concatenate([b[k] for b in batches]) for k in batch}
    valid, boxes = batch["valid"], batch["boxes"]
    assert valid[:, 0].all() and 0 < valid.sum() < valid.size  # toy scenes hold 1..3 shapes
    assert np.array_equal(batch["use_box"], valid & (valid.sum(1, keepdims=True) > 1))
    assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[..., 2:] > boxes[..., :2])[valid].all()
    assert ((batch["masks"] >= 0) & (batch["masks"] <= 1)).all()
    for name in ("refs", "boxes", "masks"):
        assert not batch[name][~valid].any(), f"{name} of empty slots must be zero"
        assert all(batch[name][valid].reshape(valid.sum(), -1).std(1) > 0)
    assert not batch["placeholders"][~valid].any() and batch["placeholders"][valid].all()
    # References: subjects on white, normalised with the encoder's mean and std.
    white = (1.0 - np.asarray(CONFIG.image.mean)) / np.asarray(CONFIG.image.std)
    assert np.isclose(batch["refs"][valid], white, atol=1e-5).all(-1).mean() > 0.2


def test_regions_are_the_masks_or_the_boxes(scenes):
    masks = _examples(_loader(scenes, num_epochs=1))
    assert np.array_equal(masks["regions"], masks["masks"])  # region_box_prob = 0
    mixed = _examples(_loader(scenes, num_epochs=1, region_box_prob=0.5))
    m, valid = CONFIG.latent_size, mixed["valid"]
    boxed = [not np.array_equal(r, k) for r, k in zip(mixed["regions"], mixed["masks"])]
    assert 0.25 < np.mean(boxed) < 0.75
    for regions, boxes, slots in zip(mixed["regions"][boxed], mixed["boxes"][boxed], valid[boxed]):
        for region, box in zip(regions[slots], boxes[slots]):
            assert np.array_equal(region, box_pixels(box, m))
        assert not regions[~slots].any()


def test_masks_lie_in_their_boxes(scenes):
    examples = _examples(_loader(scenes, num_epochs=1))
    m = CONFIG.latent_size
    for masks, boxes, valid in zip(examples["masks"], examples["boxes"], examples["valid"]):
        for mask, box in zip(masks[valid], boxes[valid] * m):
            rows, cols = np.flatnonzero(mask.max(1) > 0), np.flatnonzero(mask.max(0) > 0)
            support = np.asarray([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
            # Toy boxes are their masks' bounding boxes: equal up to a pixel of resampling.
            assert np.abs(support - box).max() <= 1.0, (support, box)


def test_placeholders_point_at_the_placeholder_token(scenes):
    examples = _examples(_loader(scenes, num_epochs=1, **NO_DROPS))
    sks, is_, the = (TOKENIZER.ids(word)[0] for word in (PLACEHOLDER, "is", "the"))
    shapes = {TOKENIZER.ids(shape)[-1] for shape in toy.ToyWorld().shapes}
    for ids, slots, labels, valid in zip(
        examples["ids"], examples["placeholders"], examples["label_positions"], examples["valid"]
    ):
        slots, labels = slots[valid], labels[valid]
        assert (ids[slots] == sks).all() and (ids[slots - 1] == is_).all()
        assert (labels == slots - 2).all() and (ids[labels - 1] == the).all()
        assert set(ids[labels]) <= shapes


@pytest.mark.parametrize(
    "rates, flags",
    [
        ({"p_text": 1.0}, (True, False, False)),
        ({"p_both": 1.0}, (True, True, True)),
        ({"p_mask": 1.0}, (False, True, False)),
        ({}, (False, False, False)),
    ],
)
def test_drops_at_certain_rates(scenes, rates, flags):
    (batch,) = _take(_loader(scenes, **{**NO_DROPS, **rates}), 1)
    for name, expected in zip(("drop_text", "drop_loc", "drop_objs"), flags):
        assert (batch[name] == expected).all(), name
    empty = TOKENIZER.plain("")
    assert (batch["ids"] == empty).all(1).all() == flags[0]
    assert not (batch["ids"] == empty).all(1).any() or flags[0]


def test_drop_frequencies(scenes):
    draws = [cfg_drops(r, 0.05, 0.05, 0.05) for r in np.random.default_rng(0).random(100_000)]
    kinds = [(d["drop_text"], d["drop_loc"], d["drop_objs"]) for d in draws]
    for kind in [(True, False, False), (True, True, True), (False, True, False)]:
        assert abs(kinds.count(kind) / len(kinds) - 0.05) < 0.003, kind
    assert kinds.count((False, False, False)) / len(kinds) == pytest.approx(0.85, abs=0.005)
    # Through the pipeline, defaults: 1024 examples, each a draw of its own.
    examples = _examples(_loader(scenes, num_epochs=16))
    text, loc, objs = (examples[k] for k in ("drop_text", "drop_loc", "drop_objs"))
    assert not (objs & ~(text & loc)).any()  # the objects go only with text and location
    for flag, rate in [(text, 0.10), (loc, 0.10), (objs, 0.05)]:
        assert abs(flag.mean() - rate) < 0.035, flag.mean()


def test_seeds_make_the_batches(scenes):
    first, again, other = (_take(_loader(scenes, seed=s), 3) for s in (7, 7, 8))
    assert all(_same(a, b) for a, b in zip(first, again))
    assert not any(np.array_equal(a["refs"], b["refs"]) for a, b in zip(first, other))


def test_resume_is_exact(scenes):
    loader = _loader(scenes)
    for _ in range(6):
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))
    expected = _take(loader, 5)  # crosses into the second epoch (8 batches each)
    resumed = _loader(scenes)
    resumed.set_state(state)
    assert all(_same(a, b) for a, b in zip(expected, _take(resumed, 5)))
    wrong = _loader(scenes, batch_size=4)
    with wrong, pytest.raises(UserError, match="resume"):
        wrong.set_state(state)


def test_state_with_int_keys_survives_json():
    state = {"future_states": {1: {"next_index": 4}}, "exhausted": [0, 1], "n": np.int64(3)}
    assert _from_jsonable(json.loads(json.dumps(_jsonable(state)))) == {
        "future_states": {1: {"next_index": 4}},
        "exhausted": [0, 1],
        "n": 3,
    }


def test_processes_split_each_epoch(scenes, scene_index):
    seen = []
    for process in (0, 1):
        examples = _examples(
            _loader(scenes, 4, process_index=process, process_count=2, num_epochs=1)
        )
        seen.append([scene_index[image.tobytes()] for image in examples["image"]])
    assert len(seen[0]) == len(seen[1]) == SCENES // 2
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(SCENES))


def test_corrupt_record_is_skipped_and_counted(tmp_path, scene_index):
    path = _write_scenes(tmp_path, corrupt_index=13)
    loader = _loader(path, batch_size=1, num_epochs=1)
    examples = _examples(loader)
    assert loader.corrupt_count == 1
    assert sorted(scene_index[image.tobytes()] for image in examples["image"]) == [
        i for i in range(SCENES) if i != 13
    ]


def test_toy_captions_leave_appearance_to_the_reference(scenes):
    # Backgrounds keep their colour ('light blue'): only the subjects' appearance goes.
    background_words = {w for name in toy.BACKGROUNDS for w in name.split()}
    words = [w for w in [*toy.COLOURS, *PATTERNS] if w not in background_words]
    full = FULL_VOCAB
    appearance = {full.ids(w)[0] for w in words if len(full.ids(w)) == 1}
    assert len(appearance) >= 8
    config = CONFIG
    for describe, expected in ((0.0, False), (1.0, True)):
        loader_config = LoaderConfig.from_dict(
            {"path": scenes, "describe_prob": describe, **NO_DROPS}
        )
        loader = make_loader(
            loader_config, config, full, batch_size=16, seed=0, process_index=0, process_count=1
        )
        with loader:
            ids = next(loader)["ids"]
        assert all(bool(appearance & set(row)) == expected for row in ids)
    record = toy.make_scene(toy.ToyWorld(size=SIDE), 3, seed=5)
    plain = training_caption(record, np.random.default_rng(0), describe_prob=0.0)
    assert not set(plain.replace(",", "").split()) & set(words)
    assert plain.endswith(f"on a {record.attributes['background']} background")
    assert [s.label for s in record.subjects] == [w for w in plain.split() if w in SHAPE_WORDS]
    photo = Record(image=record.image, caption="a red dog", source_id="x", width=SIDE, height=SIDE)
    assert training_caption(photo, np.random.default_rng(0), 0.0) == "a red dog"


def test_crop_window_holds_the_boxes():
    rng = np.random.default_rng(0)
    boxes = np.asarray([[30.0, 5.0, 45.0, 20.0], [50.0, 10.0, 60.5, 25.0]])
    windows = np.asarray([crop_window(boxes, 100, 40, rng) for _ in range(400)])
    assert (windows[:, 2] == 40).all() and (windows[:, 1] == 0).all()
    assert windows[:, 0].min() == 21 and windows[:, 0].max() == 30  # every start that fits
    too_wide = np.asarray([[5.0, 0.0, 25.0, 20.0], [35.0, 0.0, 55.0, 20.0]])
    assert crop_window(too_wide, 60, 20, rng) == (20, 0, 20)  # centred on the subjects
    assert crop_window(np.asarray([[0.0, 0.0, 8.0, 8.0]]), 10, 40, rng)[:2] == (0, 0)


def _box_record():
    """A 60 x 20 photo with three subjects too far apart for one 20 px square."""
    image = np.full((20, 60, 3), 90, np.uint8)
    subjects = []
    layout = [("dog", (5, 25), 0.5), ("cat", (35, 55), 0.9), ("cup", (26, 34), 0.5)]
    for label, (x1, x2), score in layout:
        mask = np.zeros((20, 60), bool)
        mask[4:16, x1:x2] = True
        image[mask] = (200, 40, 40)
        box = (float(x1), 4.0, float(x2), 16.0)
        subjects.append(Subject(label, box, encode_mask(mask), score=score))
    return Record(encode_image(image), "a dog, a cup and a cat", "boxes", 60, 20, tuple(subjects))


def test_best_subjects_and_a_centred_crop_when_they_cannot_all_fit():
    geometry = Geometry(16, 16, 2, 16, (0.5,) * 3, (0.5,) * 3, single_subject_box=False)
    transform = ExampleTransform(ExampleConfig(**NO_DROPS), geometry, FULL_VOCAB)
    example = transform.random_map(_box_record(), np.random.default_rng(0))
    # cat (best score), then dog (tied with cup, listed first); the crop is x 20..40.
    assert np.allclose(example["boxes"], [[0.75, 0.2, 1.0, 0.8], [0.0, 0.2, 0.25, 0.8]])
    assert example["use_box"].all() and example["valid"].all()
    label_ids = example["ids"][example["label_positions"]]
    assert list(label_ids) == [FULL_VOCAB.ids("cat")[-1], FULL_VOCAB.ids("dog")[-1]]
    assert example["masks"][0][:, :11].max() == 0 and example["masks"][0][4:12, 12:].min() > 0.9


def test_masks_shrink_with_antialiasing():
    checkerboard = np.indices((64, 64)).sum(0) % 2 == 1
    assert np.allclose(resize_mask(checkerboard, 16), 0.5, atol=0.01)  # not 0/1 aliasing
    assert np.array_equal(resize_mask(checkerboard, 64), checkerboard)


def test_reference_augmentation():
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    off = {"rotate_degrees": 0.0, "perspective_prob": 0.0}
    flipped = augment_reference(square, rng, ExampleConfig(**off, hflip_prob=1.0))
    assert np.array_equal(flipped, square[:, ::-1])
    assert np.array_equal(
        augment_reference(square, rng, ExampleConfig(**off, hflip_prob=0.0)), square
    )
    warped = augment_reference(square, rng, ExampleConfig(perspective_prob=1.0))
    assert warped.shape == square.shape and (warped == 255).all(-1).any()  # white fill shows
    corners = np.stack([perspective_corners(24, 24, 0.5, rng) for _ in range(300)])
    assert corners.min() == 0 and corners.max() == 23
    assert corners[:, 0].max() == 6 and corners[:, 2].min() == 17  # 0.5 * half side inwards
    start = np.asarray([[0, 0], [23, 0], [23, 23], [0, 23]], np.float64)
    a, b, c, d, e, f, g, h = perspective_coefficients(start, corners[0])
    for (x, y), (u, v) in zip(corners[0], start):  # each moved corner samples its source
        w = g * x + h * y + 1
        assert np.allclose([(a * x + b * y + c) / w, (d * x + e * y + f) / w], [u, v])


def test_loader_config_reads_its_keys_only():
    data = ml_collections.ConfigDict({"path": "/x", "p_text": 0.1, "toy_scenes": 5000})
    assert LoaderConfig.from_dict(data) == LoaderConfig(
        path="/x", example=ExampleConfig(p_text=0.1)
    )
    with pytest.raises(UserError, match="p_mask"):
        ExampleConfig(p_mask=1.5)
    with pytest.raises(UserError, match="exceed"):
        ExampleConfig(p_text=0.5, p_both=0.4, p_mask=0.2)
    with pytest.raises(UserError, match="data.path"):
        LoaderConfig.from_dict({"p_text": 0.1})


def test_worker_process_gives_the_same_batches_and_resumes(scenes):
    # One worker process (its start costs ~10 s here: it imports grain, jax, transformers).
    expected = _take(_loader(scenes), 4)
    with _loader(scenes, worker_count=1) as loader:
        got = [next(loader) for _ in range(2)]
        state = json.loads(json.dumps(loader.get_state()))
        got += [next(loader) for _ in range(2)]
        loader.set_state(state)
        again = [next(loader) for _ in range(2)]
    assert all(_same(a, b) for a, b in zip(expected, got))
    assert all(_same(a, b) for a, b in zip(expected[2:], again))
