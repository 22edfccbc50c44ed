"""`sdjax eval dreambench` end to end on DreamBench's real photos, with tiny random models.

A tiny random pipeline (16 px) and tiny random DINO / CLIP metric models (transformers
`ViTModel` / `CLIPModel`, saved as folders) run 2 subjects (dog, backpack) x 2 prompts x
2 images plus their pair. Checked: DreamBench's file parses (30 subjects, 9 live, 25 + 25
prompts, the 30 pairs); files and tables are written; every score in results.jsonl and
single/pairs.json equals a direct computation with `sdjax.eval.similarity` on the saved
PNGs; a rerun with more prompts generates only the new ones and leaves the old images
alone; an image depends only on (seed, subject, prompt); changed settings, a missing data
folder, missing metric weights and an unknown subject exit 2 with one line.
"""

import json
import os
import shutil
from pathlib import Path
from statistics import fmean

import numpy as np
import pytest
import transformers
from parity import randomise_
from PIL import Image
from tiny import tiny_pipeline

import sdjax.sampling
from sdjax.cli import main
from sdjax.eval.dreambench import read_results
from sdjax.eval.dreambench_data import (
    OBJECT_PAIRS,
    PAIRS,
    PET_OBJECT_PAIRS,
    PET_PAIRS,
    read_bench,
)
from sdjax.eval.metric_models import load_clip, load_dino
from sdjax.eval.similarity import clip_i, clip_t, dino_similarity
from sdjax.pipeline import save_pipeline
from sdjax.tokenizer import Tokenizer

SUBJECTS, PROMPTS, IMAGES, STEPS = "dog,backpack", 2, 2, 2
TEXT_LENGTH = 32  # the tiny CLIP's text positions


def cli(argv: list[str]) -> int:
    """`sdjax eval dreambench ARGV`."""
    return main(["eval", "dreambench", *argv])


@pytest.fixture(scope="module")
def bench(shared_data):
    return read_bench(os.path.join(shared_data, "dreambench"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders of a tiny pipeline, a tiny DINO ViTModel and a tiny CLIPModel (random)."""
    root = tmp_path_factory.mktemp("models")
    save_pipeline(tiny_pipeline(), str(root / "pipeline"))
    dino = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    randomise_(transformers.ViTModel(dino, add_pooling_layer=False)).save_pretrained(
        str(root / "dino"), safe_serialization=True
    )
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    clip = transformers.CLIPConfig(
        # CLIP's whole vocabulary: CLIP-T tokenises prompts with CLIP's BPE.
        text_config=dict(tower, vocab_size=49408, max_position_embeddings=TEXT_LENGTH),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=16,
    )
    randomise_(transformers.CLIPModel(clip), seed=1).save_pretrained(
        str(root / "clip"), safe_serialization=True
    )
    return {name: str(root / name) for name in ("pipeline", "dino", "clip")}


def argv(shared_data, models, out, *extra) -> list[str]:
    return [
        "--checkpoint",
        models["pipeline"],
        "--data",
        os.path.join(shared_data, "dreambench"),
        "--dino",
        models["dino"],
        "--clip-b32",
        models["clip"],
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--images-per-prompt",
        str(IMAGES),
        *extra,
    ]


@pytest.fixture
def count_generate(monkeypatch):
    """The number of sampler batches (`generate` calls) run so far."""
    calls = []
    original = sdjax.sampling.generate

    def counting(*args, **kwargs):
        calls.append(args[3]["ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(sdjax.sampling, "generate", counting)
    return calls


@pytest.fixture(scope="module")
def first_run(shared_data, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("dreambench") / "out"
    extra = ("--subjects", SUBJECTS, "--prompts-per-subject", str(PROMPTS), "--pairs", "--report")
    assert cli(argv(shared_data, models, out, *extra)) == 0
    return str(out)


def test_dreambench_files_parse(bench):
    assert len(bench.classes) == 30
    assert len(bench.object_prompts) == len(bench.live_prompts) == 25
    live = sorted(s for s in bench.classes if bench.is_live(s))
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert bench.prompts("dog")[10] == "a dog wearing a red hat"
    assert bench.prompts("bear_plushie")[20] == "a red stuffed animal"
    assert all(len(bench.photos(s)) >= 4 for s in bench.classes)
    assert os.path.basename(bench.reference("dog")) == "00.jpg"


def test_pairs_are_thirty_distinct_of_three_kinds(bench):
    assert len(set(map(frozenset, PAIRS))) == len(PAIRS) == 30
    kinds = {
        (False, False): OBJECT_PAIRS,
        (True, True): PET_PAIRS,
        (True, False): PET_OBJECT_PAIRS,
    }
    for kind, pairs in kinds.items():
        assert len(pairs) == 10
        assert all(tuple(bench.is_live(s) for s in pair) == kind for pair in pairs)


def test_run_writes_images_tables_and_page(first_run):
    records = read_results(first_run)
    assert [(r["mode"], r["name"], r["prompt_index"]) for r in records] == [
        ("single", "dog", 0),
        ("single", "dog", 1),
        ("single", "backpack", 0),
        ("single", "backpack", 1),
        ("pairs", "dog+backpack", 0),
        ("pairs", "dog+backpack", 1),
    ]
    assert records[0]["prompt"] == "a dog in the jungle" and records[0]["labels"] == ["dog"]
    assert records[4]["prompt"] == "a dog and a backpack in the jungle"
    assert np.array(records[4]["boxes"]).shape == (2, 4)
    for record in records:
        assert len(record["images"]) == IMAGES
        for path in record["images"] + record["references"]:
            assert Image.open(os.path.join(first_run, path)).size[0] > 0
        assert Image.open(os.path.join(first_run, record["images"][0])).size == (16, 16)
    for name in ("single.md", "single.json", "pairs.md", "pairs.json", "report/index.html"):
        assert os.path.isfile(os.path.join(first_run, name)), name
    table = Path(first_run, "single.md").read_text()
    assert (
        "| ours (sdjax) |" in table and "| Subject-Diffusion * | 0.711 | 0.787 | 0.293 |" in table
    )
    assert "quoted from the Subject-Diffusion paper" in table
    assert (
        "| UNO (FLUX, 2025) † | 0.542 | 0.733 | 0.322 |" in Path(first_run, "pairs.md").read_text()
    )


def _direct_scores(record, out, bench, dino, clip) -> dict[str, float]:
    """A record's prompt means, recomputed from its saved PNGs with the metric functions."""
    images = [os.path.join(out, p) for p in record["images"]]
    photos = [bench.photos(s) for s in record["subjects"]]
    ids = np.stack([Tokenizer(max_length=TEXT_LENGTH).plain(record["prompt"])] * len(images))
    return {
        "dino": fmean(dino_similarity(dino, images, p) for p in photos),
        "clip_i": fmean(clip_i(clip, images, p) for p in photos),
        "clip_t": clip_t(clip, images, ids),
    }


def test_scores_equal_direct_computation(first_run, bench, models):
    records = read_results(first_run)
    dino, clip = load_dino(models["dino"]), load_clip(models["clip"])
    direct = [_direct_scores(r, first_run, bench, dino, clip) for r in records]
    for record, want in zip(records, direct):
        got = {k: fmean(v) for k, v in record["scores"].items()}
        assert got == pytest.approx(want, abs=1e-6)
        assert set(record["scores"]) == set(want)
    for mode in ("single", "pairs"):
        table = json.loads(Path(first_run, f"{mode}.json").read_text())
        mine = [(r, d) for r, d in zip(records, direct) if r["mode"] == mode]
        names = dict.fromkeys(r["name"] for r, _ in mine)
        per_name = {
            n: {k: fmean(d[k] for r, d in mine if r["name"] == n) for k in direct[0]} for n in names
        }
        for name, want in per_name.items():
            got = {k: table["subjects"][name][k] for k in want}
            assert got == pytest.approx(want, abs=1e-6)
        overall = {k: fmean(s[k] for s in per_name.values()) for k in direct[0]}
        assert table["overall"] == pytest.approx(overall, abs=1e-6)
        assert table["coverage"]["complete"] is False
        assert table["paper"][0]["method"] in ("real images", "Subject-Diffusion")


def test_rerun_generates_only_new_prompts(first_run, shared_data, models, tmp_path, count_generate):
    out = tmp_path / "resumed"
    shutil.copytree(first_run, out)
    old = {p: os.stat(out / p).st_mtime_ns for r in read_results(str(out)) for p in r["images"]}
    with open(out / "results.jsonl", "a") as f:
        f.write('{"mode": "single", "na')  # a line torn by a killed run
    extra = ("--subjects", SUBJECTS, "--prompts-per-subject", "3", "--pairs")
    assert cli(argv(shared_data, models, out, *extra)) == 0
    assert count_generate == [IMAGES] * 3  # prompt 2 of dog, of backpack, of the pair
    records = read_results(str(out))
    assert len(records) == 9 and sorted(r["prompt_index"] for r in records[6:]) == [2, 2, 2]
    assert {p: os.stat(out / p).st_mtime_ns for p in old} == old
    assert json.loads((out / "single.json").read_text())["coverage"]["prompts"] == 6


def test_image_depends_only_on_seed_subject_and_prompt(first_run, shared_data, models, tmp_path):
    out = tmp_path / "alone"
    extra = ("--subjects", "backpack", "--prompts-per-subject", "1")
    assert cli(argv(shared_data, models, out, *extra)) == 0
    for k in range(IMAGES):
        path = f"images/backpack/00_{k}.png"
        alone, together = (np.asarray(Image.open(os.path.join(d, path))) for d in (out, first_run))
        np.testing.assert_array_equal(alone, together)


def test_masks_folder_masks_the_reference(first_run, shared_data, models, tmp_path):
    photo = Image.open(os.path.join(shared_data, "dreambench", "dog", "00.jpg"))
    mask = np.zeros((photo.height, photo.width), np.uint8)
    mask[: photo.height // 2, : photo.width // 4] = 255  # a tall box: a narrower auto box
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "dog.png")
    out = tmp_path / "masked"
    extra = ("--subjects", "dog", "--prompts-per-subject", "1", "--masks", str(tmp_path / "masks"))
    assert cli(argv(shared_data, models, out, *extra)) == 0
    (masked,), unmasked = read_results(str(out)), read_results(first_run)[0]
    (x1, y1, x2, y2), (u1, v1, u2, v2) = masked["boxes"][0], unmasked["boxes"][0]
    assert (x2 - x1) / (y2 - y1) < (u2 - u1) / (v2 - v1)
    images = [
        np.asarray(Image.open(os.path.join(d, "images/dog/00_0.png"))) for d in (out, first_run)
    ]
    assert np.abs(images[0].astype(int) - images[1]).max() > 0


def _one_line_error(capsys, rc, *words):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    for word in words:
        assert word in err, err


def test_changed_settings_are_refused(first_run, shared_data, models, tmp_path, capsys):
    out = tmp_path / "changed"
    shutil.copytree(first_run, out)
    rc = cli(argv(shared_data, models, out, "--subjects", SUBJECTS, "--seed", "1"))
    _one_line_error(capsys, rc, "seed=0", "another --out")


BAD_INPUT = {
    "missing data": (lambda a: a.__setitem__(a.index("--data") + 1, "/nonexistent"), "not found"),
    "missing weights": (lambda a: a.__setitem__(a.index("--dino") + 1, "/no/dino"), "--dino"),
    "unknown subject": (lambda a: a.extend(["--subjects", "dog,unicorn"]), "'unicorn'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line(case, shared_data, models, tmp_path, capsys, count_generate):
    edit, word = BAD_INPUT[case]
    args = argv(shared_data, models, tmp_path / "out")
    edit(args)
    _one_line_error(capsys, cli(args), word)
    assert count_generate == [] and not os.path.exists(tmp_path / "out" / "run.json")
