"""The toy evaluation's cases and their images.

A case: held-out subjects (attribute dicts), a background and requested boxes (or None:
the sampler places the subjects). `make_cases` cycles through the kinds; `render_target`
draws a case as a perfect model would (the subjects' renders resized into their boxes);
`generate_images` samples a list of prepared cases in even batches.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdjax.conditioning import mask_box
from sdjax.data.toy import PALETTE, ToyWorld, caption, render_subject


@dataclass(frozen=True)
class Case:
    """One evaluation case: subjects (attribute dicts), background and requested boxes."""

    subjects: tuple[dict[str, str], ...]  # shape, colour, pattern, size
    background: str
    boxes: tuple[tuple[float, float, float, float], ...] | None  # None: the sampler places

    @property
    def prompt(self) -> str:
        return caption(list(self.subjects), self.background, describe=False)

    @property
    def kind(self) -> str:
        count = "one subject" if len(self.subjects) == 1 else "two subjects"
        return f"{count}, {'box' if self.boxes else 'auto'}"


def subject_key(attrs: dict) -> tuple:
    """(shape, colour, pattern, size) of a subject's attribute dict."""
    return tuple(attrs[k] for k in ("shape", "colour", "pattern", "size"))


@functools.lru_cache(maxsize=4096)
def render(world: ToyWorld, shape, colour, pattern, size, background="white"):
    """`render_subject`, cached: (uint8 `[S, S, 3]`, bool mask `[S, S]`); do not modify."""
    return render_subject(world, shape, colour, pattern, size, background)


def subject_render(world: ToyWorld, attrs: dict, background: str = "white"):
    """A subject of the case alone, centred on `background`: (image, mask)."""
    return render(world, *subject_key(attrs), background)


def _disjoint(a, b) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def _place(world: ToyWorld, subjects, rng) -> tuple:
    """Boxes the size of the subjects' renders at random whole-pixel places, not overlapping."""
    n = world.size
    while True:
        boxes = []
        for attrs in subjects:
            x1, y1, x2, y2 = mask_box(subject_render(world, attrs)[1])
            x, y = rng.integers(0, n - (x2 - x1) + 1), rng.integers(0, n - (y2 - y1) + 1)
            boxes.append((x / n, y / n, (x + x2 - x1) / n, (y + y2 - y1) / n))
        if len(boxes) == 1 or _disjoint(*boxes):
            return tuple(boxes)


def make_cases(world: ToyWorld, n: int, seed: int, max_subjects: int = 2) -> list[Case]:
    """`n` cases of held-out subjects (two subjects differ in shape, colour and pattern)."""
    heldout = sorted(world.heldout_combos)
    kinds = [(k, boxed) for k in (1, 2) if k <= max_subjects for boxed in (True, False)]
    cases = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        count, boxed = kinds[i % len(kinds)]
        combos = [heldout[rng.integers(len(heldout))]]
        if count == 2:
            others = [c for c in heldout if all(a != b for a, b in zip(c, combos[0]))]
            combos.append(others[rng.integers(len(others))])
        subjects = tuple(
            {"shape": s, "colour": c, "pattern": p, "size": str(rng.choice(world.sizes))}
            for s, c, p in combos
        )
        background = str(rng.choice(world.backgrounds))
        cases.append(Case(subjects, background, _place(world, subjects, rng) if boxed else None))
    return cases


def exchange_boxes(case: Case) -> Case:
    """A two-subject case with its two requested boxes exchanged (box obedience)."""
    return dataclasses.replace(case, boxes=case.boxes[::-1])


def case_subjects(world: ToyWorld, case: Case) -> list:
    """The case's subjects for the sampler: references rendered alone, on white, with masks."""
    from sdjax.sampling import Subject

    subjects = []
    for attrs, box in zip(case.subjects, case.boxes or [None] * len(case.subjects)):
        image, mask = subject_render(world, attrs)
        subjects.append(Subject(image, attrs["shape"], mask, box))
    return subjects


def render_target(world: ToyWorld, case: Case, boxes, resolution: int) -> np.ndarray:
    """The case as a perfect model would draw it: uint8 `[R, R, 3]`."""
    n = world.size
    canvas = np.empty((n, n, 3), np.uint8)
    canvas[:] = PALETTE[case.background]
    for attrs, box in zip(case.subjects, boxes):
        image, mask = subject_render(world, attrs, case.background)
        x1, y1, x2, y2 = mask_box(mask)
        bx1, by1, bx2, by2 = (round(float(v) * n) for v in box)
        patch = Image.fromarray(image[y1:y2, x1:x2]).resize((bx2 - bx1, by2 - by1), Image.BICUBIC)
        canvas[by1:by2, bx1:bx2] = np.asarray(patch)
    return np.asarray(Image.fromarray(canvas).resize((resolution,) * 2, Image.BICUBIC))


def _sample(pipeline, inputs: list[dict], subject_steps: int, settings: dict, bar):
    """uint8 `[n, R, R, 3]`: even batches (one compile, little padding); batch b starts
    from the noise of `fold_in(key(seed), b)`, so both systems share their noise."""
    import jax
    import jax.numpy as jnp

    from sdjax.sampling import for_platform, generate

    pipeline = for_platform(pipeline, jax.default_backend())
    batches = -(-len(inputs) // settings["batch_size"])
    size = -(-len(inputs) // batches)
    out = []
    for b in range(batches):
        chunk = inputs[b * size : (b + 1) * size]
        padded = chunk + [chunk[-1]] * (size - len(chunk))
        images = generate(
            pipeline.config,
            settings["steps"],
            pipeline.params,
            {k: np.stack([c[k] for c in padded]) for k in chunk[0]},
            jax.random.fold_in(jax.random.key(settings["seed"]), b),
            jnp.float32(settings["text_scale"]),
            jnp.float32(settings["image_scale"]),
            jnp.int32(subject_steps),
        )
        out.append(np.asarray(images)[: len(chunk)])
        bar.update(len(chunk))
    return np.concatenate(out)


def generate_images(
    pipeline, world, cases, inputs, boxes, settings, progress, desc: str = "toy eval"
) -> dict:
    """system -> uint8 `[n, R, R, 3]`: the model, text only (no subject steps) and the
    target. inputs: per case, `sampling.prepare_inputs`; boxes: the boxes it used;
    settings: seed, steps, text_scale, image_scale, batch_size."""
    from tqdm import tqdm

    with tqdm(total=2 * len(cases), desc=desc, unit="image", disable=not progress) as bar:
        images = {
            "model": _sample(pipeline, inputs, settings["steps"], settings, bar),
            "text_only": _sample(pipeline, inputs, 0, settings, bar),
        }
    r = pipeline.config.resolution
    images["target"] = np.stack([render_target(world, c, b, r) for c, b in zip(cases, boxes)])
    return images
