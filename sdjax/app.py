"""`sdjax app`: personalise in the browser. A local Gradio page on a model (the embedded
default, a pipeline folder or a training workdir) where each subject is a photo, an optional
mask (uploaded, or brushed over the photo), a label and a box drawn with the mouse on a
canvas of the output frame (or typed, or left to the sampler).

`generate` is the one function behind the page and its API (`gradio_client`: api_name
"generate"). It makes the same checks as `sdjax sample` and reports bad input as one
sentence in the page (`gr.Error`); its PNG carries the same settings text. Requests are
queued one at a time; the sampler is compiled for the page's defaults before the server
starts, so the first request is not the slow one.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from sdjax.box_canvas import COLOURS, box_texts, canvas, canvas_from_texts
from sdjax.errors import InputWarning, UserError
from sdjax.subjects import Subject, parse_box

if TYPE_CHECKING:
    from sdjax.pipeline import Pipeline

SLOTS = 3  # subjects the page offers (fewer when the model takes fewer)
FIELDS = 5  # page fields per subject (`subjects_of`)
SHOWN_PX = 256  # results are shown at least this large (nearest-neighbour)
BRUSH = ("#ff00ff", 0.5)  # strokes over the photo; any stroke pixel is the mask
DEFAULT_STEPS = 50  # as `sdjax sample`
MAX_IMAGES = 8


def picture(**kwargs) -> gr.Image:
    """A `gr.Image` whose upload that is not a picture is one sentence in the page rather
    than Gradio's processing error. (Its preprocessing is wrapped on the instance: a
    subclass would make Gradio write a .pyi stub beside this module.)"""
    component = gr.Image(**kwargs)
    decode = component.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            name = getattr(payload, "orig_name", None) or "the upload"
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            reason = reason.replace(str(getattr(payload, "path", "")), name)
            message = f"{component.label}: {name} is not a picture ({reason})"
            raise gr.Error(message, print_exception=False) from None

    component.preprocess = preprocess
    return component


def brushed_mask(editor) -> np.ndarray | None:
    """What was brushed on a mask editor's layers (its value: {"background", "layers",
    "composite"}, RGBA arrays) as bool `[H, W]`, or None when nothing was."""
    layers = [layer for layer in (editor or {}).get("layers") or [] if layer is not None]
    strokes = [layer[..., 3] > 0 for layer in layers]
    return np.logical_or.reduce(strokes) if strokes and np.any(strokes) else None


def subjects_of(fields: list) -> list[Subject]:
    """Subjects from the page's per-subject fields, groups of `FIELDS` (photo, mask editor
    brushed over the photo, uploaded mask picture, label, box text); an uploaded mask wins
    over a brushed one. A group with no photo is unused and must be empty."""
    subjects = []
    for k in range(0, len(fields), FIELDS):
        photo, editor, mask, label, box_text = fields[k : k + FIELDS]
        name = f"subject {k // FIELDS + 1}"
        label, box_text = (label or "").strip(), (box_text or "").strip()
        if photo is None:
            if label or box_text:
                raise UserError(f"{name} has a label or box but no photo; upload its photo")
            continue
        if not label:
            raise UserError(f"{name} needs a label (its class word, e.g. star)")
        box = parse_box(box_text, f"{name} box") if box_text else None
        mask = brushed_mask(editor) if mask is None else mask
        subjects.append(Subject(photo, label, mask, box))
    if not subjects:
        raise UserError("upload a photo of at least one subject")
    return subjects


def enlarged(image: Image.Image) -> Image.Image:
    """`image` scaled up by a whole factor to at least `SHOWN_PX` (nearest-neighbour)."""
    scale = max(1, -(-SHOWN_PX // image.width))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def overlay(image: Image.Image, boxes: np.ndarray, regions: np.ndarray, count: int):
    """`image` enlarged to at least `SHOWN_PX`, with each subject's box outlined in its
    colour and, dimmed, what lies outside every subject's region (the location mask).
    boxes `[N, 4]` in [0, 1], regions `[N, h, h]`; the first `count` are used."""
    big = enlarged(image)
    inside = np.clip(regions[:count].sum(axis=0), 0, 1)
    shade = Image.fromarray((inside * 255).astype(np.uint8)).resize(big.size, Image.NEAREST)
    big = Image.composite(big, Image.blend(big, Image.new("RGB", big.size), 0.55), shade)
    draw = ImageDraw.Draw(big)
    for k in range(count):
        x1, y1, x2, y2 = (float(v) * big.width for v in boxes[k])
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=COLOURS[k], width=2)
    return big


@dataclass
class Model:
    """The model the page samples, and what is fixed with it."""

    pipeline: Pipeline
    name: str  # as the PNG settings name it
    batch: int  # images per compiled call: one per local device

    def warm_up(self, steps: int = DEFAULT_STEPS) -> float:
        """Compile the sampler for the page's defaults (one image, then a full batch)
        -> seconds."""
        from sdjax.sampling import sample

        start = time.perf_counter()
        size = self.pipeline.config.image.image_size
        subject = Subject(np.full((size, size, 3), 128, np.uint8), "star")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputWarning)  # the label may be unknown here
            for count in sorted({1, self.batch}):
                sample(
                    self.pipeline,
                    "a star",
                    [subject],
                    num_steps=steps,
                    num_images=count,
                    batch_size=self.batch,
                )
        return time.perf_counter() - start


def generate(
    model: Model,
    out_dir: str,
    prompt,
    steps,
    seed,
    num_images,
    text_scale,
    image_scale,
    subject_fraction,
    show_overlay,
    *fields,
    progress=None,
):
    """One request: (images for the gallery, the PNG with its settings) or `UserError`.
    `fields`: per subject (`subjects_of`) photo RGBA array or None, mask editor value,
    mask picture or None, label, box text."""
    from sdjax.outputs import sample_png
    from sdjax.sampling import guidance_scales, prepare_inputs

    prompt = (prompt or "").strip()
    if not prompt:
        raise UserError("type a prompt: the scene to draw the subjects into")
    steps, seed, num_images = (
        _whole(steps, "steps"),
        _whole(seed, "seed"),
        _whole(num_images, "number of images"),
    )
    if num_images > MAX_IMAGES:
        raise UserError(f"at most {MAX_IMAGES} images per request, got {num_images}")
    subjects = subjects_of(list(fields))
    text_scale, image_scale = guidance_scales(model.pipeline.config, text_scale, image_scale)
    text_scale, image_scale, subject_fraction = (
        float(text_scale),
        float(image_scale),
        float(subject_fraction),
    )
    path = os.path.join(tempfile.mkdtemp(dir=out_dir), f"sdjax_seed{seed}.png")
    images = sample_png(
        model.pipeline,
        prompt,
        subjects,
        path,
        model.name,
        seed=seed,
        num_steps=steps,
        text_scale=text_scale,
        image_scale=image_scale,
        subject_fraction=subject_fraction,
        num_images=num_images,
        batch_size=model.batch,
        progress=progress,
    )
    if show_overlay:  # the boxes and regions the sampler used, placed ones included
        inputs = prepare_inputs(model.pipeline, prompt, subjects)
        shown = [overlay(im, inputs["boxes"], inputs["regions"], len(subjects)) for im in images]
    else:
        shown = [enlarged(im) for im in images]
    return shown, path


def _whole(value, name: str) -> int:
    try:
        if float(value) == int(value):
            return int(value)
    except (TypeError, ValueError, OverflowError):  # empty, NaN, infinite
        pass
    raise UserError(f"{name} must be a whole number, got {value}")


def build(model: Model, out_dir: str):
    """The page (a `gr.Blocks`) on `model`; results are written under `out_dir`."""
    config = model.pipeline.config
    slots = min(SLOTS, config.max_subjects)

    def run(*args, progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
        def advance(done, total):
            progress((done, total), desc="images", unit="images")

        progress((0, int(args[3] or 1)), desc="images", unit="images")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InputWarning)
            try:
                result = generate(model, out_dir, *args, progress=advance)
            except UserError as err:
                raise gr.Error(str(err), print_exception=False) from None
        for warning in caught:
            if issubclass(warning.category, InputWarning):
                gr.Warning(str(warning.message))
        return result

    with gr.Blocks(title="sdjax: Subject-Diffusion") as page:
        gr.Markdown(
            "## sdjax: Subject-Diffusion\n"
            f"Model: **{model.name}**, {config.resolution}x{config.resolution} px. Upload "
            "a photo per subject (a cut-out's transparency is its mask, or brush the "
            "subject over its photo), give its label, and draw its box on the frame "
            "(empty: placed by the sampler)."
        )
        fields = []
        with gr.Row():
            for k in range(slots):
                with gr.Column(min_width=220):
                    gr.Markdown(f"**Subject {k + 1}**")
                    photo = picture(
                        label=f"subject {k + 1} photo",
                        type="numpy",
                        image_mode="RGBA",
                        sources=["upload", "clipboard"],
                        elem_id=f"photo{k + 1}",
                        height=200,
                    )
                    with gr.Accordion(f"subject {k + 1} mask (optional)", open=False) as masks:
                        brush = gr.ImageEditor(
                            label="brush over the subject",
                            type="numpy",
                            image_mode="RGBA",
                            sources=[],
                            brush=gr.Brush(colors=[BRUSH], color_mode="fixed"),
                            transforms=(),
                            layers=False,
                            format="png",
                            elem_id=f"brush{k + 1}",
                            height=220,
                        )
                        mask = picture(
                            label="or upload a mask picture (white = subject)",
                            type="numpy",
                            image_mode="RGBA",
                            sources=["upload"],
                            elem_id=f"mask{k + 1}",
                            height=160,
                        )
                    label = gr.Textbox(label=f"subject {k + 1} label", elem_id=f"label{k + 1}")
                    box = gr.Textbox(
                        label=f"subject {k + 1} box x1, y1, x2, y2 in [0, 1]",
                        placeholder="draw it on the frame, or leave empty",
                        elem_id=f"box{k + 1}",
                    )
                    # the photo to brush over, shown again when the mask panel opens
                    photo.change(lambda im: im, photo, brush)
                    masks.expand(lambda im: im, photo, brush)
                    fields += [photo, brush, mask, label, box]
        with gr.Row():
            with gr.Column():
                frame = canvas(slots)
                prompt = gr.Textbox(
                    label="prompt",
                    elem_id="prompt",
                    placeholder="e.g. a star on a beige background",
                )
                with gr.Row():
                    steps = gr.Number(
                        DEFAULT_STEPS, label="DDIM steps", precision=0, elem_id="steps"
                    )
                    seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                    count = gr.Number(
                        1,
                        label="images",
                        elem_id="count",
                        precision=0,
                        minimum=1,
                        maximum=MAX_IMAGES,
                    )
                with gr.Row():
                    text_scale = gr.Number(config.text_scale, label="text guidance")
                    image_scale = gr.Number(config.image_scale, label="image guidance")
                    fraction = gr.Slider(
                        0, 1, 1.0, step=0.05, label="fraction of steps with the subjects"
                    )
                show = gr.Checkbox(
                    False, label="overlay boxes and location mask", elem_id="overlay"
                )
                go = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(
                    label="results",
                    format="png",
                    columns=2,
                    elem_id="results",
                    object_fit="contain",
                )
                download = gr.File(label="PNG with its settings", elem_id="download")
        boxes = fields[FIELDS - 1 :: FIELDS]
        frame.input(box_texts, frame, boxes)
        for box in boxes:
            box.input(canvas_from_texts, [frame, *boxes], frame)
        go.click(
            run,
            [prompt, steps, seed, count, text_scale, image_scale, fraction, show, *fields],
            [gallery, download],
            api_name="generate",
        )
    return page


def load_model(checkpoint: str | None) -> Model:
    """The pipeline to serve (`load_pipeline`), its name and batch."""
    import jax

    from sdjax.pipeline import load_pipeline

    pipeline = load_pipeline(checkpoint)
    return Model(pipeline, checkpoint or "embedded default", jax.local_device_count())


def serve(
    model: Model, host: str, port: int, max_upload_mb: float, out_dir: str, block: bool = True
):
    """Start the page (requests queued one at a time) -> (the Blocks, its URL)."""
    page = build(model, out_dir)
    page.queue(default_concurrency_limit=1, max_size=32)
    _, url, _ = page.launch(
        server_name=host,
        server_port=port,
        max_file_size=int(max_upload_mb * 2**20),
        prevent_thread_lock=not block,
        quiet=not block,
        show_error=False,
        allowed_paths=[out_dir],
        footer_links=["api"],
    )
    return page, url
