"""Prompt template and tokens, reference images, boxes and the location mask."""

import numpy as np
import pytest

from sdjax.conditioning import auto_boxes, location_mask, reference_image
from sdjax.errors import UserError
from sdjax.subjects import check_box
from sdjax.tokenizer import Tokenizer, template

SKS = 48136


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(max_length=77)


def test_template():
    assert template("a dog and a cat", ["dog", "cat"]) == (
        "a dog and a cat, the dog is sks, the cat is sks"
    )


def test_placeholder_and_label_positions(tok):
    p = tok.prompt("a photo of a dog and a cat", ["dog", "teddy bear"], slots=3)
    ids = p.ids.tolist()
    assert ids[0] == 49406 and len(ids) == 77
    assert [ids[i] for i in p.placeholder_positions[:2]] == [SKS, SKS]
    assert ids[p.label_positions[0]] == tok.clip_ids("dog")[0]
    assert ids[p.label_positions[1]] == tok.clip_ids("bear")[0]  # the label's last token
    assert p.valid.tolist() == [True, True, False] and p.placeholder_positions[2] == 0
    assert not p.truncated


def test_long_caption_is_shortened_never_the_placeholders(tok):
    caption = " ".join(["a very long caption"] * 40)
    p = tok.prompt(caption, ["dog", "cat"], slots=2)
    ids = p.ids.tolist()
    assert p.truncated and ids[-1] == 49407  # EOS is the last of the 77 tokens
    assert [ids[i] for i in p.placeholder_positions] == [SKS, SKS]
    assert ids.count(SKS) == 2


def test_too_many_subjects_or_labels(tok):
    with pytest.raises(UserError, match="subject slots"):
        tok.prompt("x", ["a", "b", "c"], slots=2)
    with pytest.raises(UserError, match="do not fit"):
        Tokenizer(max_length=8).prompt("x", ["dog", "cat"], slots=2)


def test_vocabulary_subset():
    small = Tokenizer.for_vocabulary(["a", "red", "star"], max_length=16)
    p = small.prompt("a red star", ["star"], slots=1)
    assert small.vocab_size == len(small.vocab_subset) + 1
    assert p.ids.max() < small.vocab_size
    assert small.unknown_words("a purple star") == ["purple"]
    assert small.unknown_id in small.ids("purple")


def test_reference_image_is_the_subject_on_white_square():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:] = [10, 200, 10]
    mask = np.zeros((40, 60), bool)
    mask[10:20, 5:45] = True  # a 40 x 10 subject
    ref = reference_image(image, mask, 16, (0, 0, 0), (1, 1, 1))
    assert ref.shape == (16, 16, 3)
    assert np.allclose(ref[0, 0], 1.0)  # padding is white
    assert np.allclose(ref[8, 8], [10 / 255, 200 / 255, 10 / 255], atol=0.02)  # the subject


def test_location_mask_is_zero_inside_boxes_one_outside():
    boxes = np.array([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0, 0, 1, 1]]], np.float32)
    valid = np.array([[True, True, False]])
    m = np.asarray(location_mask(boxes, valid, 4))[0, ..., 0]
    np.testing.assert_array_equal(m, [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]])


def test_auto_boxes_keep_aspect_and_do_not_overlap():
    boxes = auto_boxes([2.0, 0.5, 1.0])
    for (x1, y1, x2, y2), aspect in zip(boxes, [2.0, 0.5, 1.0]):
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        assert (x2 - x1) / (y2 - y1) == pytest.approx(aspect)
    assert all(a[2] <= b[0] for a, b in zip(boxes, boxes[1:]))


def test_auto_boxes_span_fill_unless_they_must_share_the_width():
    ((x1, y1, x2, y2),) = auto_boxes([1.0], fill=0.45)
    assert (x2 - x1, y2 - y1) == pytest.approx((0.45, 0.45))
    assert (x1 + x2) / 2 == pytest.approx(0.5)
    assert [b[2] - b[0] for b in auto_boxes([1.0, 1.0], fill=0.75)] == pytest.approx([0.45] * 2)


@pytest.mark.parametrize("box", [(0, 0, 1), (0, 0, 1.5, 1), (0.5, 0, 0.5, 1), (0, 0.6, 1, 0.2)])
def test_bad_boxes(box):
    with pytest.raises(UserError):
        check_box(box)
