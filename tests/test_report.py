"""DreamBench tables and results page (`sdjax.eval.report`) on a hand-made results folder.

The folder holds what `sdjax eval dreambench` writes (run.json, results.jsonl records,
PNG images, copied reference photos) with chosen scores, so the means are known: a
prompt's score is the mean over its images, a subject's over its prompts, the overall
score over subjects. The page is opened from disk in headless Chromium (Debian's
`chromium`; skipped only where it is not installed): every <img> must have loaded
(naturalWidth > 0), and a deleted image must be caught by the same check.
"""

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax.convert.files import write_json
from sdjax.errors import UserError
from sdjax.eval.dreambench import RESULTS, SETTINGS, Settings, append_result
from sdjax.eval.report import SOURCES, summarise, write_report, write_tables

# name -> per prompt, per image DINO scores (CLIP-I = DINO / 2, CLIP-T = 0.3 each).
DINO = {
    ("single", "dog"): [[0.5, 0.7], [0.9, 0.9]],
    ("single", "backpack"): [[0.2, 0.4]],
    ("pairs", "dog+backpack"): [[0.1, 0.3], [0.5, 0.5]],
}
SETTINGS_USED = Settings(
    checkpoint="/ckpt",
    dino="/dino",
    clip_b32="/clip-b32",
    clip_l14="/clip-l14",
    masks=None,
    seed=0,
    steps=50,
    images_per_prompt=2,
    text_scale=7.5,
    image_scale=1.5,
    subject_fraction=1.0,
    open_clip_act="quick_gelu",
)
BOXES = [[0.05, 0.2, 0.45, 0.8], [0.55, 0.3, 0.95, 0.7]]


def _image(path: Path, size, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).save(path)


def _record(out: Path, mode: str, name: str, index: int, dino: list[float]) -> dict:
    subjects = name.split("+")
    images = [f"images/{name}/{index:02d}_{k}.png" for k in range(len(dino))]
    references = [f"references/{s}.jpg" for s in subjects]
    for k, path in enumerate(images + references):
        _image(out / path, (16, 16) if k < len(dino) else (24, 16), seed=k + 10 * index)
    scores = {"dino": dino, "clip_i": [d / 2 for d in dino], "clip_t": [0.3] * len(dino)}
    scores.update(clip_i_l14=scores["clip_i"], clip_t_l14=scores["clip_t"])
    return {
        "mode": mode,
        "name": name,
        "subjects": subjects,
        "labels": subjects,
        "prompt_index": index,
        "prompt": f"a {' and a '.join(subjects)} on the beach",
        "seed": index,
        "boxes": BOXES[: len(subjects)],
        "images": images,
        "references": references,
        "scores": scores,
    }


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    write_json(str(folder / SETTINGS), asdict(SETTINGS_USED))
    for (mode, name), prompts in DINO.items():
        for index, dino in enumerate(prompts):
            append_result(str(folder), _record(folder, mode, name, index, dino))
    return folder


def test_summary_averages_images_then_prompts_then_subjects(out):
    records = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    single = summarise(records, "single")
    assert single["subjects"]["dog"]["dino"] == pytest.approx((0.6 + 0.9) / 2)
    assert single["subjects"]["backpack"]["dino"] == pytest.approx(0.3)
    assert single["overall"]["dino"] == pytest.approx((0.75 + 0.3) / 2)
    assert single["overall"]["clip_i_l14"] == pytest.approx((0.75 + 0.3) / 4)
    assert single["coverage"] == {"subjects": 2, "prompts": 3, "images": 6, "complete": False}
    assert summarise(records, "pairs")["overall"]["clip_t"] == pytest.approx(0.3)


def test_tables_quote_the_paper_and_show_l14(out):
    paths = write_tables(str(out))
    assert sorted(os.path.basename(p) for p in paths) == [
        "pairs.json",
        "pairs.md",
        "single.json",
        "single.md",
    ]
    table = (out / "single.md").read_text()
    assert "| method | DINO | CLIP-I | CLIP-T | CLIP-I L/14 | CLIP-T L/14 |" in table
    assert "| ours (sdjax) | 0.525 | 0.263 | 0.300 | 0.263 | 0.300 |" in table
    assert "| real images * | 0.774 | 0.885 | - | - | - |" in table
    assert "| dog | dog | 2 | 4 | 0.750 |" in table
    assert "quoted from the Subject-Diffusion paper" in table and "(partial)" in table
    # UNO's rows come from UNO's paper, and say so (not "the Subject-Diffusion paper").
    assert "| UNO (FLUX, 2025) † | 0.760 | 0.835 | 0.304 | - | - |" in table
    assert "† quoted from the UNO paper" in table
    pairs = json.loads((out / "pairs.json").read_text())
    assert pairs["paper"][0] == {
        "method": "Subject-Diffusion",
        "dino": 0.506,
        "clip_i": 0.696,
        "clip_t": 0.31,
        "source": SOURCES["*"],
    }
    assert pairs["overall"]["dino"] == pytest.approx(0.35)
    assert pairs["settings"]["clip_l14"] == "/clip-l14"
    assert "UNO paper" in pairs["paper"][1]["source"]


def test_page_holds_tables_prompts_and_boxes(out):
    page = Path(write_report(str(out))).read_text()
    assert page.count("<img ") == 10 + 4  # 2 per prompt, 4 references (1 + 1 + 2)
    assert "Subject-Diffusion *" in page and "a dog and a backpack on the beach" in page
    assert "UNO (FLUX, 2025) †" in page and "quoted from the UNO paper" in page
    assert 'style="left:5.0%;top:20.0%;width:40.0%;height:60.0%"' in page
    assert 'src="../images/dog%2Bbackpack/01_1.png"' in page
    assert "<script" not in page


def test_no_results_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no DreamBench results"):
        write_report(str(tmp_path))


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,20000",  # a viewport taller than the page: lazy images load too
]
# Run on `load`: every image's natural width, written into the DOM that --dump-dom prints.
PROBE = (
    '<script>addEventListener("load", () => { document.body.dataset.images = '
    "JSON.stringify(Array.from(document.images, i => [i.getAttribute('src'), i.naturalWidth]));"
    " });</script>"
)


def loaded_widths(page: Path, tmp_path: Path) -> list[tuple[str, int]]:
    """(src, naturalWidth) of every <img> of `page` after headless Chromium loaded it."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    probe = page.with_name("probe.html")  # beside the page: same relative paths
    probe.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    profile = tmp_path / "chromium-profile"
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    probe.unlink()
    found = re.search(r'data-images="([^"]*)"', result.stdout)
    assert found, result.stderr[-2000:]
    return [tuple(x) for x in json.loads(found[1].replace("&quot;", '"').replace("&amp;", "&"))]


def test_every_image_loads_in_chromium(out, tmp_path):
    page = Path(write_report(str(out)))
    widths = loaded_widths(page, tmp_path)
    assert len(widths) == 14
    assert all(width > 0 for _, width in widths), widths
    assert ("../references/dog.jpg", 24) in widths and ("../images/dog/00_0.png", 16) in widths
    (out / "images" / "dog+backpack" / "01_1.png").unlink()
    broken = [src for src, width in loaded_widths(page, tmp_path) if width == 0]
    assert broken == ["../images/dog%2Bbackpack/01_1.png"]
