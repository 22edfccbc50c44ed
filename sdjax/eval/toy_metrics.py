"""The toy evaluation's measurements, chance levels and report (table, sheet).

Images are uint8 `[R, R, 3]`, boxes (x1, y1, x2, y2) in [0, 1]; metrics are per subject
unless said.

- shape / colour / pattern / all: the attribute classifier (`toy_classifier`) on the crop
  of the subject's box; 'present' is how often it finds a subject there at all (a subject
  it does not find has every attribute wrong).
- clip_i: cosine between the model's own frozen image encoder CLS embeddings of the
  reference (rendered alone on white, downscaled to the output size) and of the generated
  subject, both segmented as below and cut out onto white (`segmented`).
- iou: the box against the generated subject's bounding box. Segmentation: pixels farther
  than `FOREGROUND_DISTANCE` (RGB) from the prompted background colour (above the
  background's shading, about 60 at three sigma, and below every subject colour's distance
  to every background, at least 100); 8-connected components; the subject is the largest
  component with a pixel centre in its box (specks and other subjects are left out).
- background (per image): the median colour outside every box is nearest, among the toy
  backgrounds, to the prompted one.
- swap / leak (two-subject cases, whose subjects differ in colour and pattern; lower is
  better): a box reads as the other subject's colour or pattern (per box); both boxes
  read as the same colour or the same pattern (per case).
- identity (two-subject cases, per subject): the generated subject's toy-CLIP embedding is
  nearer its own reference than its partner's.
- obedience (two-subject cases with boxes, generated again with the two boxes exchanged;
  per subject): the subject's new box reads as its own colour, i.e. it followed its box.
Chance: 1/|vocabulary| (all three: 1/|combinations|); iou of a box of the same size placed
uniformly in the image; clip_i to a random other toy subject of the same size; background
1/|backgrounds|; swap and leak for independent uniform colour and pattern guesses;
identity 1/2 (one of the two); obedience 1/|colours|.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from sdjax.conditioning import box_pixels, mask_box, normalise, reference_image
from sdjax.data.toy import PALETTE, ToyWorld
from sdjax.eval.toy_cases import Case, render, subject_key
from sdjax.subject_diffusion import encode_subjects

FOREGROUND_DISTANCE = 70.0
METRICS = {  # key -> table label
    "shape": "shape accuracy",
    "colour": "colour accuracy",
    "pattern": "pattern accuracy",
    "all": "all three right",
    "present": "subject found in its box",
    "clip_i": "toy-CLIP image similarity",
    "iou": "layout IoU",
    "background": "background as prompted",
    "swap": "swap rate (lower is better)",
    "leak": "leak rate (lower is better)",
    "identity": "own identity, two subjects",
    "obedience": "box obedience (boxes exchanged)",
}
ATTRIBUTES = ("shape", "colour", "pattern")


def foreground(image: np.ndarray, background: str) -> np.ndarray:
    """bool `[H, W]`: pixels farther than FOREGROUND_DISTANCE from the background colour."""
    diff = image.astype(np.float32) - np.asarray(PALETTE[background], np.float32)
    return np.linalg.norm(diff, axis=-1) > FOREGROUND_DISTANCE


def subject_mask(fg: np.ndarray, box) -> np.ndarray:
    """The largest 8-connected foreground component with a pixel in `box` (maybe empty)."""
    labels, _ = ndimage.label(fg, structure=np.ones((3, 3)))
    candidates = np.unique(labels[box_pixels(box, fg.shape[0]) & fg])
    if candidates.size == 0:
        return np.zeros_like(fg)
    return labels == candidates[np.argmax(np.bincount(labels.ravel())[candidates])]


def box_iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union)


def chance_iou(box, grid: int = 33) -> float:
    """Mean IoU of `box` and a box of its size placed uniformly in the image (quadrature)."""

    def overlap(start, size):
        positions = np.linspace(0.0, 1.0 - size, grid)
        return np.clip(np.minimum(positions, start) + size - np.maximum(positions, start), 0, None)

    w, h = box[2] - box[0], box[3] - box[1]
    inter = overlap(box[1], h)[:, None] * overlap(box[0], w)[None, :]
    return float((inter / (2 * w * h - inter)).mean())


def background_name(image: np.ndarray, boxes, names) -> str:
    """The toy background nearest the median colour outside every box."""
    outside = ~np.any([box_pixels(b, image.shape[0]) for b in boxes], axis=0)
    colour = np.median(image[outside] if outside.any() else image.reshape(-1, 3), axis=0)
    return min(names, key=lambda n: float(np.linalg.norm(colour - np.asarray(PALETTE[n]))))


def segmented(image: np.ndarray, mask: np.ndarray, config) -> np.ndarray:
    """The image encoder's view of a segmented subject `[S, S, 3]`; an empty mask gives a
    blank (white) view, which is what cutting out a missing subject leaves."""
    size, mean, std = config.image.image_size, config.image.mean, config.image.std
    if not mask.any():
        return normalise(np.full((size, size, 3), 255, np.uint8), size, mean, std)
    return reference_image(image, mask, size, mean, std)


@functools.partial(jax.jit, static_argnames="config")
def _unit_cls(config, params, views):
    _, cls = encode_subjects(config, params, views[:, None])
    return cls[:, 0] / jnp.maximum(jnp.linalg.norm(cls[:, 0], axis=-1, keepdims=True), 1e-12)


def embed(pipeline, views: np.ndarray, batch: int = 64) -> np.ndarray:
    """Unit CLS embeddings `[M, D]` of the model's image encoder for its inputs `[M, S, S,
    3]` (`segmented` views), in fixed-size batches (one compile)."""
    count = len(views)
    views = np.concatenate([views, np.zeros((-count % batch, *views.shape[1:]), views.dtype)])
    out = [
        np.asarray(_unit_cls(pipeline.config, pipeline.params, views[i : i + batch]))
        for i in range(0, len(views), batch)
    ]
    return np.concatenate(out)[:count]


def reference_table(pipeline, world: ToyWorld) -> dict[tuple, np.ndarray]:
    """(shape, colour, pattern, size) -> unit embedding of that subject rendered alone on
    white, at the model's output size, segmented as generated subjects are."""
    keys = list(itertools.product(world.shapes, world.colours, world.patterns, world.sizes))
    r = pipeline.config.resolution
    views = []
    for key in keys:
        image = Image.fromarray(render(world, *key)[0]).resize((r, r), Image.BICUBIC)
        image = np.asarray(image)
        mask = subject_mask(foreground(image, "white"), (0.0, 0.0, 1.0, 1.0))
        views.append(segmented(image, mask, pipeline.config))
    return dict(zip(keys, embed(pipeline, np.stack(views))))


def measure(pipeline, classifier, cases, boxes, images, table, world) -> list[dict]:
    """Per case: each subject's classifier reading, found box, IoU, clip_i (and with two
    subjects clip_partner, the similarity to the other's reference), and the background
    colour read off the image."""
    pairs = [(i, j) for i, case in enumerate(cases) for j in range(len(case.subjects))]
    readings = classifier.predict(
        np.stack([images[i] for i, _ in pairs]), np.stack([boxes[i][j] for i, j in pairs])
    )
    masks = [
        subject_mask(foreground(images[i], cases[i].background), boxes[i][j]) for i, j in pairs
    ]
    views = np.stack([segmented(images[i], m, pipeline.config) for (i, _), m in zip(pairs, masks)])
    embeds = embed(pipeline, views)
    out = [
        {"subjects": [], "background": background_name(images[i], boxes[i], world.backgrounds)}
        for i in range(len(cases))
    ]
    for (i, j), reading, mask, unit in zip(pairs, readings, masks, embeds):
        found = None if not mask.any() else [v / mask.shape[0] for v in mask_box(mask)]
        subjects = cases[i].subjects
        row = {
            "reading": reading,
            "found_box": found,
            "iou": 0.0 if found is None else box_iou(found, boxes[i][j]),
            "clip_i": float(unit @ table[subject_key(subjects[j])]),
        }
        if len(subjects) == 2:
            row["clip_partner"] = float(unit @ table[subject_key(subjects[1 - j])])
        out[i]["subjects"].append(row)
    return out


def summarise(cases: list[Case], measured: list[dict]) -> dict[str, float | None]:
    """Mean of every metric over the cases (swap/leak: None without two-subject cases)."""
    rows = [(a, s) for c, m in zip(cases, measured) for a, s in zip(c.subjects, m["subjects"])]
    right = {k: [s["reading"][k] == a[k] for a, s in rows] for k in ATTRIBUTES}
    out = {k: float(np.mean(v)) for k, v in right.items()}
    out["all"] = float(np.mean(np.all([right[k] for k in ATTRIBUTES], axis=0)))
    out["present"] = float(np.mean([s["reading"]["present"] for _, s in rows]))
    out["clip_i"] = float(np.mean([s["clip_i"] for _, s in rows]))
    out["iou"] = float(np.mean([s["iou"] for _, s in rows]))
    out["background"] = float(
        np.mean([m["background"] == c.background for c, m in zip(cases, measured)])
    )
    pairs = [
        ([s["reading"] for s in m["subjects"]], c.subjects)
        for c, m in zip(cases, measured)
        if len(c.subjects) == 2
    ]
    looks = ("colour", "pattern")
    swaps = [
        any(reads[i][k] == subjects[1 - i][k] for k in looks)
        for reads, subjects in pairs
        for i in (0, 1)
    ]
    leaks = [
        any(reads[0][k] is not None and reads[0][k] == reads[1][k] for k in looks)
        for reads, _ in pairs
    ]
    out["swap"] = float(np.mean(swaps)) if swaps else None
    out["leak"] = float(np.mean(leaks)) if leaks else None
    own = [s["clip_i"] > s["clip_partner"] for _, s in rows if "clip_partner" in s]
    out["identity"] = float(np.mean(own)) if own else None
    return out


def obedience(cases: list[Case], measured: list[dict]) -> float | None:
    """Share of subjects whose box reads as their own colour, in cases generated with the
    boxes exchanged (`cases` hold the exchanged boxes); None without such cases."""
    follows = [
        s["reading"]["colour"] == a["colour"]
        for c, m in zip(cases, measured)
        for a, s in zip(c.subjects, m["subjects"])
    ]
    return float(np.mean(follows)) if follows else None


def chance(
    world: ToyWorld, cases: list[Case], boxes, table, exchanged: bool = False
) -> dict[str, float | None]:
    """The metrics of guessing (module docstring)."""
    subjects = [(a, b) for c, bs in zip(cases, boxes) for a, b in zip(c.subjects, bs)]
    nc, npat = len(world.colours), len(world.patterns)
    guess_match = 1.0 - (1.0 - 1.0 / nc) * (1.0 - 1.0 / npat)

    def clip_chance(attrs):
        mine = subject_key(attrs)
        others = [k for k in table if k[3] == mine[3] and k != mine]
        return float(np.mean([table[mine] @ table[k] for k in others]))

    two = any(len(c.subjects) == 2 for c in cases)
    return {
        "shape": 1.0 / len(world.shapes),
        "colour": 1.0 / nc,
        "pattern": 1.0 / npat,
        "all": 1.0 / (len(world.shapes) * nc * npat),
        "present": None,
        "clip_i": float(np.mean([clip_chance(a) for a, _ in subjects])),
        "iou": float(np.mean([chance_iou(b) for _, b in subjects])),
        "background": 1.0 / len(world.backgrounds),
        "swap": guess_match if two else None,
        "leak": guess_match if two else None,
        "identity": 0.5 if two else None,
        "obedience": 1.0 / nc if exchanged else None,
    }


def report(
    world: ToyWorld, cases: list[Case], boxes, measured: dict, table, exchanged=None
) -> dict:
    """`evaluate_toy`'s results: metrics (system -> metric -> value, chance included),
    by_kind (kind -> system -> ...), cases and exchanged (each case with its readings per
    system). measured: system -> `measure`'s list; exchanged: (the two-subject cases with
    their boxes exchanged, system -> `measure`'s list for them) or None."""
    by_kind = {}
    for kind in dict.fromkeys(c.kind for c in cases):
        pick = [i for i, c in enumerate(cases) if c.kind == kind]
        by_kind[kind] = {
            k: summarise([cases[i] for i in pick], [m[i] for i in pick])
            for k, m in measured.items()
        }
    metrics = {k: summarise(cases, m) for k, m in measured.items()}
    x_cases, x_measured = exchanged or ([], {})
    for system, values in metrics.items():
        values["obedience"] = obedience(x_cases, x_measured.get(system, []))
    if x_cases:
        by_kind[EXCHANGED] = {
            k: summarise(x_cases, m) | {"obedience": obedience(x_cases, m)}
            for k, m in x_measured.items()
        }
    metrics["chance"] = chance(world, cases, boxes, table, bool(x_cases))
    return {
        "metrics": metrics,
        "by_kind": by_kind,
        "cases": _records(cases, boxes, measured),
        "exchanged": _records(x_cases, [list(c.boxes) for c in x_cases], x_measured),
    }


EXCHANGED = "two subjects, boxes exchanged"


def _records(cases, boxes, measured: dict) -> list[dict]:
    return [
        {"prompt": c.prompt, "kind": c.kind, "subjects": list(c.subjects), "boxes": b}
        | {k: m[i] for k, m in measured.items()}
        for i, (c, b) in enumerate(zip(cases, boxes))
    ]


def markdown_table(report: dict) -> str:
    """metric | model | text-only | chance | target render, from `evaluate_toy`'s report."""
    m = report["metrics"]
    lines = ["| metric | model | text-only | chance | target render |", "|---|---|---|---|---|"]
    for key, label in METRICS.items():
        values = [m[s][key] for s in ("model", "text_only", "chance", "target")]
        cells = ["-" if v is None else f"{v:.3f}" for v in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_SHEET_COLUMNS = ("reference", "requested box", "generated", "text only")
_PAD, _LINE = 6, 14


def _outlined(image: np.ndarray, boxes, tile: int, labels=None) -> Image.Image:
    """The image enlarged (nearest) to `tile` px with the boxes outlined (and labelled)."""
    out = Image.fromarray(image).resize((tile, tile), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    for i, box in enumerate(boxes):
        x1, y1, x2, y2 = (v * tile for v in box)
        draw.rectangle([x1 - 1, y1 - 1, x2, y2], outline=(0, 0, 0))
        if labels:
            draw.text((x1 + 2, y1 + 1), labels[i], fill=(0, 0, 0))
    return out


def write_sheet(path: str, cases, boxes, images: dict, references, rows: int = 8) -> None:
    """A PNG of the first `rows` cases: reference(s) | requested box | generated | text only.

    images: system -> uint8 `[n, R, R, 3]`; references: per case, its subjects' images."""
    rows = min(rows, len(cases))
    r = images["model"].shape[1]
    tile = r * max(1, 128 // r)
    sheet = Image.new(
        "RGB",
        (len(_SHEET_COLUMNS) * (tile + _PAD) + _PAD, _LINE + rows * (tile + _LINE + _PAD)),
        (250, 250, 250),
    )
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(_SHEET_COLUMNS):
        draw.text((_PAD + c * (tile + _PAD), 1), name, fill=(0, 0, 0))
    for i, case in enumerate(cases[:rows]):
        y = _LINE + i * (tile + _LINE + _PAD)
        draw.text((_PAD, y), f"{case.prompt} ({case.kind})", fill=(0, 0, 0))
        side = tile // len(references[i])
        for k, ref in enumerate(references[i]):
            sheet.paste(Image.fromarray(ref).resize((side, side)), (_PAD + k * side, y + _LINE))
        blank = np.empty((r, r, 3), np.uint8)
        blank[:] = PALETTE[case.background]
        tiles = [
            _outlined(blank, boxes[i], tile, [a["shape"] for a in case.subjects]),
            _outlined(images["model"][i], boxes[i], tile),
            _outlined(images["text_only"][i], boxes[i], tile),
        ]
        for c, im in enumerate(tiles, start=1):
            sheet.paste(im, (_PAD + c * (tile + _PAD), y + _LINE))
    sheet.save(path)
