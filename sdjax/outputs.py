"""What sampling hands back to people: images side by side, and PNG files that carry the
settings that drew them (`sample_png`: `sdjax sample` and `sdjax app` write the same)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdjax import paths
from sdjax.subjects import Subject


def grid(images: list[Image.Image]) -> Image.Image:
    """Images side by side in rows of up to 4 (one image is returned as is)."""
    if len(images) == 1:
        return images[0]
    w, h = images[0].size
    cols = min(4, len(images))
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    return sheet


def sample_png(
    pipeline,
    prompt: str,
    subjects: Sequence[Subject],
    out: str,
    checkpoint: str,
    *,
    seed: int,
    num_steps: int,
    text_scale: float,
    image_scale: float,
    subject_fraction: float,
    **options,
) -> list[Image.Image]:
    """`sdjax.sample` (guidance scales resolved by the caller; `options`: its other
    keywords), then the images side by side written to the PNG `out` with their settings
    (`settings_text`; `checkpoint` names the model) -> the images."""
    from sdjax.sampling import sample

    images = sample(
        pipeline,
        prompt,
        subjects,
        seed=seed,
        num_steps=num_steps,
        text_scale=text_scale,
        image_scale=image_scale,
        subject_fraction=subject_fraction,
        **options,
    )
    settings = settings_text(
        prompt, subjects, seed, num_steps, text_scale, image_scale, subject_fraction, checkpoint
    )
    write_png(grid(images), out, settings)
    return images


def settings_text(
    prompt: str,
    subjects: Sequence[Subject],
    seed: int,
    steps: int,
    text_scale: float,
    image_scale: float,
    subject_fraction: float,
    checkpoint: str,
) -> dict[str, str]:
    """A sampling call's settings as PNG text: subjects as JSON (image, label, mask, box in
    [0, 1] of the output image; an image or mask given as pixels is named "(pixels)")."""

    def named(source) -> str | None:
        if source is None:
            return None
        return str(source) if isinstance(source, str | os.PathLike) else "(pixels)"

    described = [
        {
            "image": named(s.image),
            "label": s.label,
            "mask": named(s.mask),
            "box": list(s.box) if s.box else None,
        }
        for s in subjects
    ]
    return {
        "prompt": prompt,
        "subjects": json.dumps(described),
        "seed": str(seed),
        "steps": str(steps),
        "text_scale": str(text_scale),
        "image_scale": str(image_scale),
        "subject_fraction": str(subject_fraction),
        "checkpoint": checkpoint,
    }


def write_png(image: Image.Image, path: str, text: dict[str, str]) -> None:
    """Save with PNG text chunks, atomically (`sdjax.paths`: no partial file on failure)."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    data = io.BytesIO()
    image.save(data, format="PNG", pnginfo=info)
    paths.write_bytes(path, data.getvalue())
