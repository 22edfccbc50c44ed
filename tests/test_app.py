"""`sdjax app`: the page driven in a real headless Chromium (Debian's `chromium`, through
Playwright; skipped only where it is not installed), its API through `gradio_client`, the
command starting from a pipeline folder, and the page's own helpers.

The page serves the tiny test model (16 px, two subjects) so compiles are short; the boxes
dragged on the canvas must reach the sampler: the PNG's settings carry them, within a
pixel of the drag in the output frame.
"""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from sdjax.app import FIELDS, Model, brushed_mask, generate, overlay, serve, subjects_of
from sdjax.box_canvas import CANVAS_PX, box_texts, canvas_from_texts, canvas_value
from sdjax.errors import UserError

STEPS = 2
RESOLUTION = 16  # the tiny model's
SHOWN = 256  # results shown enlarged to at least app.SHOWN_PX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cut_out(colour, size=24) -> np.ndarray:
    """An RGBA cut-out: a coloured square on transparency."""
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[4:20, 6:18] = [*colour, 255]
    return rgba


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    paths = []
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        Image.fromarray(cut_out(colour)).save(root / f"{name}.png")
        paths.append(str(root / f"{name}.png"))
    return paths


@pytest.fixture(scope="module")
def app(pipe, tmp_path_factory):
    """The page on the tiny model, compiled for STEPS, listening on loopback -> its URL."""
    model = Model(pipe, "tiny test model", batch=1)
    model.warm_up(steps=STEPS)
    out = str(tmp_path_factory.mktemp("app_out"))
    page, url = serve(model, "127.0.0.1", free_port(), 10, out, block=False)
    yield url
    page.close()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium)
        yield launched
        launched.close()


def png_settings(data: bytes) -> tuple[tuple[int, int], dict]:
    image = Image.open(io.BytesIO(data))
    return image.size, dict(image.text)


def drag(page, frame, start, end) -> None:
    (x0, y0), (x1, y1) = start, end
    page.mouse.move(frame["x"] + x0, frame["y"] + y0)
    page.mouse.down()
    page.mouse.move(frame["x"] + (x0 + x1) / 2, frame["y"] + (y0 + y1) / 2)
    page.mouse.move(frame["x"] + x1, frame["y"] + y1)
    page.mouse.up()


def test_two_subjects_dragged_boxes_reach_the_sampler(app, browser, pictures):
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.goto(app)
    page.wait_for_selector("#frame .sdjax-frame")
    for k, (path, label) in enumerate(zip(pictures, ("star", "ring")), start=1):
        page.set_input_files(f"#photo{k} input[type=file]", path)
        page.fill(f"#label{k} textarea", label)
    frame = page.locator("#frame .sdjax-frame").bounding_box()
    assert round(frame["width"]) == CANVAS_PX
    drags = [((20, 30), (150, 170)), ((170, 150), (300, 290))]
    for k, (start, end) in enumerate(drags, start=1):
        drag(page, frame, start, end)  # then, as a person would, see the box's field fill
        filled = f"document.querySelector('#box{k} textarea').value !== ''"
        page.wait_for_function(filled, timeout=90_000)
    assert page.locator("#frame .sdjax-box").count() == 2
    page.fill("#prompt textarea", "a star and a ring on a beige background")
    page.fill("#steps input", str(STEPS))
    page.fill("#count input", "2")
    page.click("#generate")
    link = page.locator("#download a").first
    link.wait_for(timeout=120_000)
    shown = page.eval_on_selector_all(
        "#results img", "ims => ims.map(im => [im.naturalWidth, im.naturalHeight])"
    )
    assert shown and all(size == [SHOWN, SHOWN] for size in shown), shown
    with urllib.request.urlopen(link.get_attribute("href")) as response:
        size, settings = png_settings(response.read())
    assert size == (2 * RESOLUTION, RESOLUTION)  # two images side by side
    assert settings["prompt"] == "a star and a ring on a beige background"
    assert settings["steps"] == str(STEPS)
    subjects = json.loads(settings["subjects"])
    assert [s["label"] for s in subjects] == ["star", "ring"]
    for subject, (start, end) in zip(subjects, drags):
        dragged = np.array([*start, *end]) / CANVAS_PX * RESOLUTION
        saved = np.array(subject["box"]) * RESOLUTION
        assert np.abs(saved - dragged).max() <= 1.0, (saved, dragged)
    page.close()


def test_a_mask_brushed_over_the_photo_reaches_the_sampler(app, browser, pictures):
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.goto(app)
    page.wait_for_selector("#frame .sdjax-frame")
    page.set_input_files("#photo1 input[type=file]", pictures[0])
    page.fill("#label1 textarea", "star")
    page.get_by_text("subject 1 mask (optional)").click()
    page.locator("#brush1 button[aria-label=Brush]").click()
    canvas = page.locator("#brush1 canvas").last.bounding_box()
    x, y = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
    page.mouse.move(x - 10, y)
    page.mouse.down()
    page.mouse.move(x + 10, y, steps=5)
    page.mouse.up()
    page.fill("#prompt textarea", "a star")
    page.fill("#steps input", str(STEPS))
    page.click("#generate")
    link = page.locator("#download a").first
    link.wait_for(timeout=120_000)
    with urllib.request.urlopen(link.get_attribute("href")) as response:
        _, settings = png_settings(response.read())
    assert json.loads(settings["subjects"])[0]["mask"] == "(pixels)"
    page.close()


def test_bad_input_is_one_sentence_in_the_page(app, browser, pictures):
    page = browser.new_page()
    page.goto(app)
    page.wait_for_selector("#frame .sdjax-frame")
    page.set_input_files("#photo1 input[type=file]", pictures[0])
    page.fill("#prompt textarea", "a star")
    page.click("#generate")  # no label
    message = page.get_by_text("subject 1 needs a label (its class word, e.g. star)")
    message.first.wait_for(timeout=60_000)
    assert "Traceback" not in page.content()
    page.close()


def test_the_same_function_through_gradio_client(app, pictures, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app, verbose=False)
    subject = lambda path, label, box: [handle_file(path), None, None, label, box]  # noqa: E731
    gallery, png = client.predict(
        "a star on a beige background",
        STEPS,
        7,  # seed
        1,  # images
        3.0,
        3.0,
        1.0,
        True,  # overlay boxes
        *subject(pictures[0], "star", "0.5, 0.5, 1, 1"),
        *subject(pictures[1], "ring", ""),
        api_name="/generate",
    )
    assert len(gallery) == 1
    with open(png, "rb") as f:
        size, settings = png_settings(f.read())
    assert size == (RESOLUTION, RESOLUTION) and settings["seed"] == "7"
    boxes = [s["box"] for s in json.loads(settings["subjects"])]
    assert boxes == [[0.5, 0.5, 1.0, 1.0], None]
    with pytest.raises(Exception, match="subject 2 box"):
        client.predict(
            "a star", STEPS, 0, 1, 3.0, 3.0, 1.0, False,
            *subject(pictures[0], "star", ""),
            *subject(pictures[1], "ring", "0.9, 0.1, 0.2, 0.5"),
            api_name="/generate",
        )  # fmt: skip
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(Exception, match="subject 1 photo: notes.png is not a picture"):
        client.predict(
            "a star", STEPS, 0, 1, 3.0, 3.0, 1.0, False,
            *subject(str(text), "star", ""), *[None] * FIELDS,
            api_name="/generate",
        )  # fmt: skip


def test_the_command_starts_from_a_pipeline_folder(folder):
    port = free_port()
    command = [sys.executable, "-m", "sdjax", "app", "--checkpoint", folder, "--port", str(port)]
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # one device a core
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    assert response.status == 200 and b"sdjax" in response.read()
                break
            except OSError:
                assert process.poll() is None, process.stdout.read()[-3000:]
                time.sleep(1)
        else:
            pytest.fail("sdjax app did not answer within 300 s")
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0]
    assert "compiled in" in output, output[-3000:]


def test_command_errors_are_one_line(tmp_path):
    for args, message in (
        (["--port", "70000"], "--port must be in 1..65535"),
        (["--checkpoint", str(tmp_path / "missing")], "missing"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "sdjax", "app", *args], capture_output=True, text=True
        )
        assert done.returncode == 2, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], done.stderr[-2000:]


def test_canvas_and_box_fields_agree():
    value = canvas_value([[0.1, 0.2, 0.5, 0.6], None], active=1)
    assert box_texts(value) == ["0.1, 0.2, 0.5, 0.6", ""]
    edited = canvas_from_texts(value, "0.1, 0.2, 0.5, 0.6", "0.5,0.5,0.9,0.")  # mid-typing
    assert json.loads(edited) == {"boxes": [[0.1, 0.2, 0.5, 0.6], None], "active": 1}
    edited = canvas_from_texts(value, "", "0.5 0.5 0.9 0.95")
    assert json.loads(edited)["boxes"] == [None, [0.5, 0.5, 0.9, 0.95]]


def test_brushed_strokes_are_the_mask():
    layer = np.zeros((24, 24, 4), np.uint8)
    assert brushed_mask({"background": None, "layers": [layer], "composite": None}) is None
    assert brushed_mask(None) is None
    layer[2:5, 3:9, 3] = 255
    mask = brushed_mask({"background": None, "layers": [layer], "composite": None})
    assert mask.sum() == 18 and mask[2:5, 3:9].all()


@pytest.mark.parametrize(
    "slot, message",
    [
        ([None, None, None, "star", ""], "subject 1 has a label or box but no photo"),
        (["photo", None, None, " ", ""], "subject 1 needs a label"),
        (["photo", None, None, "star", "0.5,0.5"], "subject 1 box"),
        ([None, None, None, "", ""], "upload a photo of at least one subject"),
    ],
)
def test_page_fields_are_checked(slot, message):
    fields = [cut_out((200, 30, 30)) if v == "photo" else v for v in slot]
    assert len(fields) == FIELDS
    with pytest.raises(UserError, match=message):
        subjects_of(fields)


def test_an_uploaded_mask_wins_over_brush_strokes():
    photo, picture = cut_out((200, 30, 30)), np.zeros((24, 24, 3), np.uint8)
    picture[0:4, 0:4] = 255
    layer = np.zeros((24, 24, 4), np.uint8)
    layer[10:12, 10:12, 3] = 255
    editor = {"background": photo, "layers": [layer], "composite": photo}
    (subject,) = subjects_of([photo, editor, picture, "star", ""])
    assert subject.mask is picture
    (subject,) = subjects_of([photo, editor, None, "star", ""])
    assert subject.mask.sum() == 4


def test_overlay_outlines_each_box_in_its_colour():
    image = Image.new("RGB", (16, 16), "white")
    regions = np.zeros((2, 8, 8), np.float32)
    regions[0, :4, :4] = 1
    boxes = np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], np.float32)
    shown = np.asarray(overlay(image, boxes, regions, 1))
    assert shown.shape == (SHOWN, SHOWN, 3)
    assert tuple(shown[0, 64]) == (0xE6, 0x19, 0x4B)  # subject 1's outline
    assert shown[64, 64].tolist() == [255, 255, 255]  # inside its region: untouched
    assert shown[200, 200].max() < 200  # outside every region: dimmed


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": "  "}, "type a prompt"),
        ({"steps": None}, "steps must be a whole number, got None"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"seed": float("nan")}, "seed must be a whole number"),
        ({"num_images": 9}, "at most 8 images per request"),
        ({"steps": 5000}, "steps must be in 1..1000"),
        ({"text_scale": -1.0}, "guidance scales must be >= 0"),
        ({"subject_fraction": 1.5}, "subject fraction must be in"),
    ],
)
def test_request_settings_are_checked_before_sampling(pipe, tmp_path, change, message):
    settings = dict(
        prompt="a star", steps=STEPS, seed=0, num_images=1, text_scale=3.0, image_scale=3.0,
        subject_fraction=1.0, show_overlay=False,
    )  # fmt: skip
    settings.update(change)
    photo = [cut_out((200, 30, 30)), None, None, "star", ""]
    with pytest.raises(UserError, match=message):
        generate(Model(pipe, "tiny", 1), str(tmp_path), *settings.values(), *photo)
