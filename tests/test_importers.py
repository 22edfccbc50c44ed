"""Importers: the authors' webdataset tars, COCO annotations, image folders with sidecars."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from sdjax.cli import main
from sdjax.data.importers import import_coco, import_folder, import_webdataset
from sdjax.data.importers.webdataset import tar_samples
from sdjax.data.records import encode_image, mask_array
from sdjax.data.shards import MANIFEST, RecordSource
from sdjax.errors import UserError

W, H = 200, 160


def _scene(seed: int, white: float = 0.0) -> np.ndarray:
    image = np.random.default_rng(seed).integers(40, 200, (H, W, 3), dtype=np.uint8)
    image.reshape(-1, 3)[: round(white * W * H)] = 255
    return image


def _palette_png(instances: np.ndarray) -> bytes:
    png = Image.fromarray(instances.astype(np.uint8), "P")
    png.putpalette([v for i in range(256) for v in ((i * 67) % 256, (i * 151) % 256, i)])
    buffer = io.BytesIO()
    png.save(buffer, format="PNG")
    return buffer.getvalue()


def _instance_map() -> np.ndarray:
    instances = np.zeros((H, W), np.int32)
    instances[20:110, 10:90] = 1  # dog, with a hole the importer fills
    instances[50:60, 40:50] = 0
    instances[30:100, 120:190] = 2  # ball
    instances[140:146, 150:156] = 3  # a tiny cat
    return instances


def _authors_sample(key: str, image: np.ndarray, with_png: bool = True) -> dict[str, bytes]:
    meta = {
        "caption": "a dog and a ball with a cat on the grass",
        "mask": [
            {"value": 0, "label": "background"},
            {"value": 1, "label": "dog", "logit": 0.8, "box": [8.5, 18.0, 92.0, 112.0]},
            {"value": 2, "label": "ball", "logit": 0.6, "box": [118.0, 28.0, 192.0, 101.5]},
            {"value": 3, "label": "cat", "logit": 0.9, "box": [149.0, 139.0, 157.0, 147.0]},
        ],
    }
    members = {
        f"{key}.jpg": encode_image(image, "JPEG"),
        f"{key}.txt": "Dog & ball – stock photo".encode(),
        f"{key}.json": json.dumps(meta).encode(),
    }
    if with_png:
        members[f"{key}.png"] = _palette_png(_instance_map())
    return members


def _write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def authors_tar(tmp_path_factory):
    """Three samples as the authors' pipeline writes them: good, near-white, no png."""
    path = tmp_path_factory.mktemp("wds") / "00000.tar"
    members = {
        **_authors_sample("aa000001", _scene(1)),
        **_authors_sample("aa000002", _scene(2, white=0.3)),
        **_authors_sample("aa000003", _scene(3), with_png=False),
    }
    _write_tar(path, members)
    return path, members


def test_webdataset_import_matches_the_instance_map(authors_tar, tmp_path):
    tar, members = authors_tar
    report = import_webdataset([str(tar)], str(tmp_path / "out"))
    assert report.as_dict() == {
        "images_seen": 3,
        "images_kept": 1,
        "subjects_kept": 2,
        "dropped_images": {"incomplete": 1, "near_white": 1},
        "dropped_subjects": {"area_ratio": 1},  # the tiny cat
    }
    source = RecordSource(str(tmp_path / "out"))
    assert len(source) == 1
    record = source[0]
    assert record.source_id == "00000.tar/aa000001"
    assert record.image == members["aa000001.jpg"] and (record.width, record.height) == (W, H)
    assert record.caption == "a dog and a ball with a cat on the grass"
    assert record.attributes == {"original_caption": "Dog & ball – stock photo"}
    instances = _instance_map()
    dog, ball = record.subjects  # best logit first
    assert (dog.label, dog.box, dog.score) == ("dog", (8.5, 18.0, 92.0, 112.0), 0.8)
    assert (ball.label, ball.box, ball.score) == ("ball", (118.0, 28.0, 192.0, 101.5), 0.6)
    assert np.array_equal(mask_array(dog), ndimage.binary_fill_holes(instances == 1))
    assert mask_array(dog)[55, 45]  # the hole is filled
    assert np.array_equal(mask_array(ball), instances == 2)
    assert dog.attributes == {"instance": "1"} and ball.attributes == {"instance": "2"}
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["provenance"]["report"] == report.as_dict()
    assert manifest["provenance"]["generator"] == "import-webdataset"


def test_webdataset_without_filters_keeps_every_subject(authors_tar, tmp_path):
    report = import_webdataset([str(authors_tar[0])], str(tmp_path / "out"), filters=None)
    assert (report.images_kept, report.subjects_kept) == (2, 6)
    assert report.dropped_images == {"incomplete": 1}


def test_tar_members_group_by_key(tmp_path):
    path = tmp_path / "t.tar"
    _write_tar(path, {"d/x.1.jpg": b"1", "d/x.1.seg.png": b"2", "d/y.json": b"3", ".hidden": b""})
    assert list(tar_samples(str(path))) == [
        ("d/x", {"1.jpg": b"1", "1.seg.png": b"2"}),
        ("d/y", {"json": b"3"}),
    ]
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(UserError, match="cannot read tar"):
        list(tar_samples(str(tmp_path / "bad.tar")))


def _rectangle(x, y, w, h) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y : y + h, x : x + w] = True
    return mask


def _uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths in column-major order, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    return ([0] if flat[0] else []) + np.diff(bounds).tolist()


def _annotation(id_, category, bbox, segmentation, crowd=0) -> dict:
    return {
        "id": id_,
        "image_id": 1,
        "category_id": category,
        "iscrowd": crowd,
        "area": bbox[2] * bbox[3],
        "bbox": bbox,
        "segmentation": segmentation,
    }


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    (root / "images" / "one.jpg").write_bytes(encode_image(_scene(4), "JPEG"))
    dog = _rectangle(100, 20, 60, 70)
    rle = mask_utils.encode(np.asfortranarray(dog.astype(np.uint8)))
    ball = _rectangle(20, 80, 55, 55)
    polygon = [[10, 10, 70, 10, 70, 60, 10, 60]]
    compressed = {"size": [H, W], "counts": rle["counts"].decode()}
    uncompressed = {"size": [H, W], "counts": _uncompressed_rle(ball)}
    annotations = [
        _annotation(1, category=1, bbox=[10, 10, 60, 50], segmentation=polygon),
        _annotation(2, category=2, bbox=[100, 20, 60, 70], segmentation=compressed),
        _annotation(3, category=3, bbox=[20, 80, 55, 55], segmentation=uncompressed),
        _annotation(4, category=1, bbox=[0, 0, 30, 30], segmentation=compressed, crowd=1),
    ]
    instances = {
        "images": [
            {"id": 1, "file_name": "one.jpg", "width": W, "height": H},
            {"id": 2, "file_name": "missing.jpg", "width": W, "height": H},
        ],
        "annotations": annotations,
        "categories": [
            {"id": 1, "name": "person"},
            {"id": 2, "name": "dog"},
            {"id": 3, "name": "sports ball"},
        ],
    }
    captions = {
        "annotations": [
            {"id": 9, "image_id": 1, "caption": "a later caption"},
            {"id": 3, "image_id": 1, "caption": " a person with a dog and a ball "},
        ]
    }
    (root / "instances.json").write_text(json.dumps(instances))
    (root / "captions.json").write_text(json.dumps(captions))
    return root, {"dog": dog, "sports ball": ball}


def test_coco_import_decodes_rle_and_polygons(coco_files, tmp_path):
    root, expected = coco_files
    out = tmp_path / "out"
    report = import_coco(
        str(root / "instances.json"), str(root / "images"), str(out), str(root / "captions.json")
    )
    assert report.as_dict() == {
        "images_seen": 2,
        "images_kept": 1,
        "subjects_kept": 3,
        "dropped_images": {"unreadable": 1},
        "dropped_subjects": {"crowd": 1},
    }
    record = RecordSource(str(out))[0]
    assert record.caption == "a person with a dog and a ball"  # lowest caption id
    assert record.source_id == "coco/one.jpg" and record.attributes == {"coco_image_id": "1"}
    dog, ball, person = record.subjects  # by area, largest first
    assert [s.label for s in record.subjects] == ["dog", "sports ball", "person"]
    assert dog.box == (100.0, 20.0, 160.0, 90.0) and ball.box == (20.0, 80.0, 75.0, 135.0)
    assert dog.score == 1.0
    assert np.array_equal(mask_array(dog), expected["dog"])  # compressed RLE
    assert np.array_equal(mask_array(ball), expected["sports ball"])  # uncompressed RLE
    polygon = mask_array(person)
    rectangle = _rectangle(10, 10, 60, 50)
    assert (polygon & rectangle).sum() / (polygon | rectangle).sum() > 0.9


def test_coco_without_captions_joins_category_names(coco_files, tmp_path):
    root, _ = coco_files
    import_coco(str(root / "instances.json"), str(root / "images"), str(tmp_path / "out"))
    assert RecordSource(str(tmp_path / "out"))[0].caption == "dog, sports ball, person"


def _write_folder(root) -> None:
    (root / "sub").mkdir(parents=True)
    Image.fromarray(_scene(5)).save(root / "sub" / "pets.jpg", quality=90)
    Image.fromarray(_instance_map() == 2).save(root / "sub" / "ball_mask.png")
    sidecar = {
        "caption": "a dog and a ball",
        "subjects": [
            {"label": "dog", "box": [10, 20, 90, 110], "score": 0.7},
            {"label": "ball", "box": [120, 30, 190, 100], "mask": "ball_mask.png"},
        ],
    }
    (root / "sub" / "pets.json").write_text(json.dumps(sidecar))
    Image.fromarray(_scene(6)).save(root / "broken.webp")
    (root / "broken.json").write_text('{"caption": "no subjects key"}')
    (root / "lonely.json").write_text("{}")
    Image.fromarray(_scene(7)).save(root / "no_sidecar.png")  # not looked at


def test_folder_import(tmp_path):
    _write_folder(tmp_path / "in")
    report = import_folder(str(tmp_path / "in"), str(tmp_path / "out"))
    assert report.as_dict() == {
        "images_seen": 3,
        "images_kept": 1,
        "subjects_kept": 2,
        "dropped_images": {"bad_sidecar": 1, "no_image": 1},
        "dropped_subjects": {},
    }
    record = RecordSource(str(tmp_path / "out"))[0]
    assert record.source_id == "sub/pets.json"
    assert record.image == (tmp_path / "in" / "sub" / "pets.jpg").read_bytes()
    ball, dog = record.subjects  # ball's default score 1 beats 0.7
    assert (ball.label, ball.score, dog.label, dog.score) == ("ball", 1.0, "dog", 0.7)
    assert np.array_equal(mask_array(ball), _instance_map() == 2)
    assert np.array_equal(mask_array(dog), _rectangle(10, 20, 80, 90))


def _cli(*argv) -> int:
    return main(["data", *argv])


def test_cli_imports_and_reports(authors_tar, coco_files, tmp_path, capsys):
    assert _cli("import", "webdataset", str(authors_tar[0]), "--out", str(tmp_path / "w")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "kept 1 of 3 images, 2 subjects",
        "dropped images: incomplete 1, near_white 1",
        "dropped subjects: area_ratio 1",
        f"wrote 1 records to {tmp_path / 'w'}",
    ]
    root, _ = coco_files
    coco_args = ["--instances", str(root / "instances.json"), "--images", str(root / "images")]
    assert _cli("import", "coco", *coco_args, "--out", str(tmp_path / "c"), "--no-filter") == 0
    assert capsys.readouterr().out.startswith("kept 1 of 2 images, 3 subjects")
    _write_folder(tmp_path / "f")
    assert _cli("import", "folder", str(tmp_path / "f"), "--out", str(tmp_path / "o")) == 0
    assert capsys.readouterr().out.startswith("kept 1 of 3 images, 2 subjects")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["import", "webdataset", "{tmp}/none.tar", "--out", "{tmp}/o"], "does not exist"),
        (
            [
                "import",
                "coco",
                "--instances",
                "{tmp}/i.json",
                "--images",
                "{tmp}",
                "--out",
                "{tmp}/o",
            ],
            "does not exist",
        ),
        (
            [
                "import",
                "coco",
                "--instances",
                "{tmp}/bad.json",
                "--images",
                "{tmp}",
                "--out",
                "{tmp}/o",
            ],
            "not COCO format",
        ),
        (["import", "folder", "{tmp}/nowhere", "--out", "{tmp}/o"], "does not exist"),
        (
            ["import", "folder", "{tmp}", "--out", "{tmp}/o", "--records-per-shard", "0"],
            "records-per-shard",
        ),
        (["import", "webdataset", "--out", "{tmp}/o"], "required"),
        (["import", "parquet", "x", "--out", "{tmp}/o"], "invalid choice"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "bad.json").write_text('{"images": []}')
    argv = [a.format(tmp=tmp_path) for a in argv]
    try:
        status = _cli(*argv)
    except SystemExit as exit_:  # argparse's errors
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
