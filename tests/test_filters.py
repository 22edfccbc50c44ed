"""The authors' filters: each at its threshold, just inside and just outside; filter_subjects."""

import numpy as np
import pytest

from sdjax.data import filters as F
from sdjax.data.records import Record, Subject, encode_image, encode_mask

EPS = 1e-6


def test_thresholds_are_the_authors():
    assert (F.MIN_NOUNS, F.MAX_NOUNS, F.MIN_DETECTIONS, F.MAX_DETECTIONS) == (3, 8, 2, 8)
    assert (F.BOX_THRESHOLD, F.TEXT_THRESHOLD, F.NMS_IOU, F.MIN_SHORT_SIDE) == (0.25, 0.2, 0.5, 600)
    assert (F.MIN_AREA_RATIO, F.MAX_AREA_RATIO, F.MIN_ASPECT, F.MAX_ASPECT) == (0.08, 0.7, 0.3, 3)
    assert (F.MIN_LOGIT, F.MIN_MASK_FILL, F.MAX_OVERLAP, F.MAX_WHITE_FRACTION) == (
        0.3,
        0.6,
        0.8,
        0.1,
    )
    assert (F.MAX_SUBJECTS, F.MIN_CROP_BOX_AREA, F.NEAR_WHITE_LEVEL) == (2, 200, 230)


def test_counts_include_both_ends():
    assert [F.noun_count_ok(n) for n in (2, 3, 4, 7, 8, 9)] == [0, 1, 1, 1, 1, 0]
    assert [F.detection_count_ok(n) for n in (1, 2, 3, 7, 8, 9)] == [0, 1, 1, 1, 1, 0]
    assert [F.short_side_ok(w, 900) for w in (599, 600, 601)] == [False, True, True]
    assert not F.short_side_ok(900, 599)


def test_detector_thresholds_are_strict():
    scores = [0.25 - EPS, 0.25, 0.25 + EPS]
    assert F.confident_boxes(scores).tolist() == [False, False, True]
    tokens = np.array([[0.2 - EPS, 0.2, 0.2 + EPS]])
    assert F.label_tokens(tokens).tolist() == [[False, False, True]]


def _pair_with_iou(iou: float) -> np.ndarray:
    """Two 10-high boxes sharing x in [0, 10]: the second's width w gives IoU 10 / w."""
    return np.array([[0, 0, 10, 10], [0, 0, 10 / iou, 10]], np.float64)


def test_nms_suppresses_above_half_iou():
    for iou, kept in [(0.5 + 1e-4, [1]), (0.5, [1, 0]), (0.5 - 1e-4, [1, 0])]:
        boxes = _pair_with_iou(iou)
        assert F.box_iou(boxes[:1], boxes[1:])[0, 0] == pytest.approx(iou)
        assert F.nms(boxes, [0.4, 0.9]).tolist() == kept
    # equal scores keep the earlier box; disjoint boxes all stay, best first
    assert F.nms(_pair_with_iou(0.9), [0.5, 0.5]).tolist() == [0]
    far = np.array([[0, 0, 1, 1], [5, 5, 6, 6], [9, 9, 10, 10]])
    assert F.nms(far, [0.1, 0.3, 0.2]).tolist() == [1, 2, 0]


def test_area_ratio_is_open_interval():
    # a 1000 x 10 image; a full-height box covers its width / 1000 of it
    def ok(ratio):
        return bool(F.area_ratio_ok([[0, 0, ratio * 1000, 10]], 1000, 10)[0])

    assert [ok(0.08 - EPS), ok(0.08), ok(0.08 + EPS)] == [False, False, True]
    assert [ok(0.7 - EPS), ok(0.7), ok(0.7 + EPS)] == [True, False, False]


def test_aspect_is_open_interval():
    def ok(aspect):
        return bool(F.aspect_ok([[0, 0, aspect * 100, 100]])[0])

    assert [ok(0.3 - EPS), ok(0.3), ok(0.3 + EPS)] == [False, False, True]
    assert [ok(3 - EPS), ok(3), ok(3 + EPS)] == [True, False, False]
    assert not F.aspect_ok([[0, 5, 10, 5]])[0]  # flat box


def test_logit_is_strict():
    assert F.logit_ok([0.3 - EPS, 0.3, 0.3 + EPS]).tolist() == [False, False, True]


def test_label_is_one_word_of_the_caption():
    caption = "A dog and a Tennis ball near a category sign"
    assert F.label_in_caption("dog", caption) and F.label_in_caption("tennis", caption)
    assert not F.label_in_caption("tennis ball", caption)  # two words
    assert not F.label_in_caption("cat", caption)  # only inside "category"
    assert not F.label_in_caption("", caption)
    assert not F.label_in_caption("horse", caption)


def test_mask_fill_at_threshold():
    box = (2, 2, 12, 12)  # 100 pixels
    for filled, ok in [(59, False), (60, True), (61, True)]:
        mask = np.zeros((20, 20), bool)
        mask[0, :] = True  # outside the box: does not count
        mask[2:12, 2:12].flat[:filled] = True  # fills the box row by row
        assert F.mask_fill(mask, box) == pytest.approx(filled / 100)
        assert F.mask_fills_box(mask, box) is ok


def test_overlap_with_the_smaller_box():
    kept = [[0, 0, 10, 10]]
    for share, dropped in [(0.8 - 1e-3, False), (0.8, False), (0.8 + 1e-3, True)]:
        # a 10 x 10 box shifted so that `share` of it lies inside the kept box
        shift = 10 * (1 - share)
        assert F.overlaps_kept([shift, 0, shift + 10, 10], kept) is dropped
    # the smaller area is the reference: a small box inside a big one overlaps fully
    assert F.overlaps_kept([2, 2, 4, 4], [[0, 0, 100, 100]])
    assert not F.overlaps_kept([0, 0, 10, 10], [])


def test_near_white_images():
    for white, dropped in [(9, False), (10, False), (11, True)]:  # pixels of 100
        image = np.full((10, 10, 3), 100, np.uint8)
        image.reshape(-1, 3)[:white] = 230
        assert F.near_white_fraction(image) == pytest.approx(white / 100)
        assert F.mostly_white(image) is dropped
    almost = np.full((10, 10, 3), 255, np.uint8)
    almost[..., 1] = 229  # one channel below 230: not near-white
    assert F.near_white_fraction(almost) == 0


def test_top_two_by_score():
    assert F.top_by_score([0.4, 0.9, 0.5, 0.9]).tolist() == [1, 3]
    assert F.top_by_score([0.4]).tolist() == [0]


def test_crop_box_area_is_strict():
    assert [F.crop_box_ok([0, 0, 20, a / 20]) for a in (200 - EPS, 200, 200 + 1e-3)] == [
        False,
        False,
        True,
    ]


def test_dominant_instance_fills_holes():
    instances = np.zeros((12, 12), np.int32)
    instances[2:10, 2:10] = 1
    instances[4:6, 4:6] = 0  # a hole
    instances[2:10, 8:12] = 2  # instance 2 covers less of the box than instance 1
    mask = F.dominant_instance_mask(instances, (1, 1, 10, 10))
    expected = np.zeros((12, 12), bool)
    expected[2:10, 2:8] = True
    assert np.array_equal(mask, expected)
    assert not F.dominant_instance_mask(instances, (10, 0, 12, 2)).any()  # background only


def _record(subjects, caption="a dog, a cat and a ball", size=100, white=0.0):
    image = np.full((size, size, 3), 90, np.uint8)
    image.reshape(-1, 3)[: round(white * size * size)] = 255
    made = []
    for label, box, score, *mask_box in subjects:  # the mask fills mask_box, default box
        mask = np.zeros((size, size), bool)
        mask[F.box_window(mask_box[0] if mask_box else box, mask.shape)] = True
        made.append(Subject(label=label, box=box, mask=encode_mask(mask), score=score))
    return Record(encode_image(image), caption, "t/0", size, size, tuple(made))


def test_filter_subjects_order_and_reasons():
    record = _record(
        [
            ("ball", (0, 0, 40, 40), 0.5),
            ("dog", (0, 0, 50, 50), 0.9),  # best: tested first, kept
            ("cat", (0, 0, 5, 5), 0.95),  # too small
            ("cat", (60, 60, 100, 75), 0.4),  # aspect 40 / 15 fine, area 0.06: too small
            ("cat", (50, 0, 90, 40), 0.2),  # score too low
            ("horse", (50, 50, 90, 90), 0.8),  # not in the caption
            ("ball", (55, 0, 95, 40), 0.6, (55, 0, 95, 20)),  # mask fills half its box
            ("cat", (50, 50, 90, 90), 0.7),  # kept
        ]
    )
    kept, reasons = F.filter_subjects(record)
    assert [(s.label, s.score) for s in kept.subjects] == [("dog", 0.9), ("cat", 0.7)]
    assert reasons == ["area_ratio", "label", "mask_fill", "overlap", "area_ratio", "logit"]
    top, reasons = F.filter_subjects(record, F.FilterConfig(max_subjects=1))
    assert [s.label for s in top.subjects] == ["dog"] and reasons[-1] == "top_k"
    free, _ = F.filter_subjects(record, F.FilterConfig(check_label=False))
    assert [s.label for s in free.subjects] == ["dog", "horse"]


def test_filter_subjects_drops_images():
    good = [("dog", (0, 0, 50, 50), 0.9)]
    assert F.filter_subjects(_record(good, white=0.11)) == (None, ["near_white"])
    assert F.filter_subjects(_record(good, white=0.10))[0] is not None
    assert F.filter_subjects(_record([("dog", (0, 0, 5, 5), 0.9)])) == (
        None,
        ["area_ratio", "no_subjects"],
    )


def test_report_counts_and_round_trips():
    report = F.FilterReport()
    report.add(None, ["area_ratio", "no_subjects"])
    report.add(None, ["near_white"])
    kept, reasons = F.filter_subjects(_record([("dog", (0, 0, 50, 50), 0.9)]))
    report.add(kept, [*reasons, "logit"])
    assert report.as_dict() == {
        "images_seen": 3,
        "images_kept": 1,
        "subjects_kept": 1,
        "dropped_images": {"near_white": 1, "no_subjects": 1},
        "dropped_subjects": {"area_ratio": 1, "logit": 1},
    }
    assert F.FilterReport.from_dict(report.as_dict()) == report
    assert report.summary().splitlines() == [
        "kept 1 of 3 images, 1 subjects",
        "dropped images: near_white 1, no_subjects 1",
        "dropped subjects: area_ratio 1, logit 1",
    ]
