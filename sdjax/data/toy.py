"""The toy world: procedural scenes of coloured, patterned shapes with exact masks and boxes.

A scene is a `size` x `size` RGB image (default 64) on a named background colour with a
smooth shading, holding 1 to `max_subjects` subjects of distinct shapes. A subject is drawn
from a combinatorial family (shape x colour x pattern, and a size); its pattern is inked in
a dark shade of its own colour, so the colour reads the same whatever the pattern. Later
subjects are drawn over earlier ones, each keeping at least `min_visible` of its area; the
stored mask and box are the visible part. The caption names every subject and the
background: "a red striped star and a blue dotted ring on a gray background".

A fixed share of the shape x colour x pattern combinations (`ToyWorld.heldout_combos`, the
same for a given vocabulary on every machine) never appears in the 'train' split; the
'heldout' split draws only from it. Scene `i` of (seed, split) depends on nothing else, so
any scene can be regenerated alone and generation can be spread over processes.

`ToyWorld`'s vocabularies are the source of truth for classifiers and evaluation code.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sdjax.data.records import Record, Subject, encode_image, encode_mask
from sdjax.data.shapes import PATTERNS, SHAPES
from sdjax.errors import UserError

COLOURS = {  # subjects
    "red": (220, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 35),
    "green": (40, 165, 55),
    "cyan": (35, 200, 215),
    "blue": (40, 75, 220),
    "purple": (140, 55, 195),
    "pink": (245, 125, 190),
}
BACKGROUNDS = {  # light enough for the dark pattern ink to stand out
    "white": (238, 238, 232),
    "gray": (135, 135, 135),
    "beige": (215, 195, 150),
    "light blue": (175, 200, 230),
}
PALETTE = COLOURS | BACKGROUNDS
SIZE_RADIUS = {"small": 0.13, "large": 0.22}  # subject radius as a share of the image side
SPLITS = ("train", "heldout")
_INK_SHADE = 0.3  # pattern ink = this share of the subject colour
_PATTERN_PERIOD = 0.75  # pattern period in subject radii: patterns scale with their subject
_PLACEMENT_TRIES = 24


def _name_rank(shape: str, pair: tuple[str, str]) -> int:
    return zlib.crc32("/".join((shape, *pair)).encode())


@dataclass(frozen=True)
class ToyWorld:
    """Everything that defines the toy world; scenes are a function of this, a seed, a split."""

    size: int = 64
    shapes: tuple[str, ...] = tuple(SHAPES)
    colours: tuple[str, ...] = tuple(COLOURS)
    patterns: tuple[str, ...] = tuple(PATTERNS)
    sizes: tuple[str, ...] = tuple(SIZE_RADIUS)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    max_subjects: int = 3
    heldout_fraction: float = 0.125
    min_visible: float = 0.7
    max_rotation: float = 15.0  # degrees either way
    shading: float = 12.0  # amplitude of the background's smooth shading, in 0..255 levels

    def __post_init__(self):
        for kind, names, known in [
            ("shape", self.shapes, SHAPES),
            ("colour", self.colours + self.backgrounds, PALETTE),
            ("pattern", self.patterns, PATTERNS),
            ("size", self.sizes, SIZE_RADIUS),
        ]:
            unknown = [n for n in names if n not in known]
            if unknown or not names:
                raise UserError(f"toy world: unknown {kind} {unknown} (known: {list(known)})")
        if set(self.colours) & set(self.backgrounds):
            raise UserError("toy world: a subject colour cannot also be a background colour")
        if self.size < 16:
            raise UserError(f"toy world: image size {self.size} is below the minimum 16")
        if not 1 <= self.max_subjects <= len(self.shapes):
            raise UserError(f"toy world: max_subjects must be in 1..{len(self.shapes)}")
        if not 1 <= self._heldout_per_shape < len(self.colours) * len(self.patterns):
            raise UserError(
                f"toy world: heldout_fraction {self.heldout_fraction} holds out none or all"
            )

    @property
    def _heldout_per_shape(self) -> int:
        return round(self.heldout_fraction * len(self.colours) * len(self.patterns))

    @functools.cached_property
    def heldout_combos(self) -> frozenset[tuple[str, str, str]]:
        """(shape, colour, pattern) triples kept out of training, the same share per shape.

        Each shape takes, in CRC-32 order of the names (fixed on every machine), the pairs
        whose colour and pattern are held out least so far: the held-out set spreads evenly
        over colours and patterns, and every value keeps most of its combinations in train.
        """
        colour_use, pattern_use = collections.Counter(), collections.Counter()
        chosen = []
        for shape in self.shapes:
            pairs = itertools.product(self.colours, self.patterns)
            pairs = sorted(pairs, key=functools.partial(_name_rank, shape))
            for _ in range(self._heldout_per_shape):
                colour, pattern = min(pairs, key=lambda cp: (colour_use[cp[0]], pattern_use[cp[1]]))
                pairs.remove((colour, pattern))
                colour_use[colour] += 1
                pattern_use[pattern] += 1
                chosen.append((shape, colour, pattern))
        return frozenset(chosen)

    def combos(self, split: str) -> list[tuple[str, str, str]]:
        """The (shape, colour, pattern) triples scenes of `split` draw from."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r} (use one of {list(SPLITS)})")
        every = itertools.product(self.shapes, self.colours, self.patterns)
        return [t for t in every if (t in self.heldout_combos) == (split == "heldout")]


def vocabulary() -> list[str]:
    """Every word of the toy world's captions and labels (what the embedded model knows)."""
    world = ToyWorld()
    words = {"a", "an", "and", "on", "background", *BACKGROUNDS}
    for names in (world.shapes, world.colours, world.patterns):
        words.update(w for item in names for w in item.split())
    return sorted(words)


def caption(subjects: list[dict[str, str]], background: str, describe: bool = True) -> str:
    """'a red striped star, a blue dotted ring and ... on a gray background'; with
    `describe=False` the shapes alone: 'a star, a ring and ... on a gray background'."""
    phrases = []
    for a in subjects:
        words = [a["colour"], a["pattern"], a["shape"]] if describe else [a["shape"]]
        article = "an" if words[0][0] in "aeiou" else "a"
        phrases.append(" ".join([article, *words]))
    listed = phrases[-1] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{listed} on a {background} background"


@functools.lru_cache(maxsize=4)
def _shading_basis(size: int) -> np.ndarray:
    """[size, 3] bilinear weights that stretch a 3x3 grid of values over the image."""
    x = np.linspace(0.0, 2.0, size)
    return np.maximum(0.0, 1.0 - np.abs(x[:, None] - np.arange(3)[None, :])).astype(np.float32)


def _background(world: ToyWorld, name: str, rng: np.random.Generator) -> np.ndarray:
    basis = _shading_basis(world.size)
    shade = basis @ rng.normal(0.0, world.shading, (3, 3)).astype(np.float32) @ basis.T
    return np.asarray(PALETTE[name], np.float32) + shade[:, :, None]


def _paint(attrs: dict[str, str], radius: float, angle: float, offset):
    """A subject on its own patch: (coverage [n, n] in 0..1, colour [n, n, 3])."""
    half = math.ceil(1.12 * radius) + 1  # the shapes fit in 1.1 radii
    pixels = np.arange(-half, half + 1, dtype=np.float32) + 0.5
    y, x = pixels[:, None] - offset[1], pixels[None, :] - offset[0]
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = cos * x + sin * y, -sin * x + cos * y  # the subject's own frame, in pixels
    coverage = np.clip(0.5 - radius * SHAPES[attrs["shape"]](u / radius, v / radius), 0, 1)
    ink = PATTERNS[attrs["pattern"]](u, v, _PATTERN_PERIOD * radius)[:, :, None]
    colour = np.asarray(PALETTE[attrs["colour"]], np.float32)
    return coverage, colour * (1.0 - ink * (1.0 - _INK_SHADE))


def _composite(canvas: np.ndarray, window, coverage: np.ndarray, paint: np.ndarray) -> None:
    canvas[window] += coverage[:, :, None] * (paint - canvas[window])


def render_subject(
    world: ToyWorld,
    shape: str,
    colour: str,
    pattern: str,
    size: str = "large",
    background: str = "white",
    angle: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One subject, centred and unshaded on `background`: (uint8 [S, S, 3], bool [S, S]).

    For evaluation references; `angle` is in degrees.
    """
    attrs = {"shape": shape, "colour": colour, "pattern": pattern, "size": size}
    for kind, vocabulary in [
        ("shape", world.shapes),
        ("colour", world.colours),
        ("pattern", world.patterns),
        ("size", world.sizes),
    ]:
        if attrs[kind] not in vocabulary:
            raise UserError(f"unknown {kind} {attrs[kind]!r} (known: {list(vocabulary)})")
    if background not in PALETTE:
        raise UserError(f"unknown background {background!r} (known: {list(PALETTE)})")
    radius = SIZE_RADIUS[size] * world.size
    coverage, paint = _paint(attrs, radius, math.radians(angle), (0.0, 0.0))
    canvas = np.empty((world.size, world.size, 3), np.float32)
    canvas[:] = PALETTE[background]
    mask = np.zeros((world.size, world.size), bool)
    n, start = coverage.shape[0], (world.size - coverage.shape[0] + 1) // 2
    window = np.s_[start : start + n, start : start + n]
    _composite(canvas, window, coverage, paint)
    mask[window] = coverage > 0.5
    return np.round(canvas).astype(np.uint8), mask


@functools.lru_cache(maxsize=8)
def _choices(world: ToyWorld, split: str) -> dict[str, list[tuple[str, str]]]:
    """shape -> the (colour, pattern) pairs `split` may give it (shapes with none left out)."""
    by_shape: dict[str, list[tuple[str, str]]] = {}
    for shape, colour, pattern in world.combos(split):
        by_shape.setdefault(shape, []).append((colour, pattern))
    return by_shape


def _place(world: ToyWorld, canvas: np.ndarray, placed: list, attrs, rng) -> None:
    """Paints a subject over the scene where every earlier one stays visible enough.

    `placed` holds (attributes, full area, visible mask [S, S]) per subject; a subject that
    fits nowhere in `_PLACEMENT_TRIES` random positions is left out of the scene.
    """
    radius = SIZE_RADIUS[attrs["size"]] * world.size * rng.uniform(0.9, 1.1)
    angle = math.radians(rng.uniform(-world.max_rotation, world.max_rotation))
    coverage, paint = _paint(attrs, radius, angle, rng.random(2))
    mask, n = coverage > 0.5, coverage.shape[0]
    for y0, x0 in rng.integers(0, world.size - n + 1, size=(_PLACEMENT_TRIES, 2)):
        window = np.s_[y0 : y0 + n, x0 : x0 + n]
        if all(
            (visible.sum() - (visible[window] & mask).sum()) >= world.min_visible * area
            for _, area, visible in placed
        ):
            _composite(canvas, window, coverage, paint)
            for _, _, visible in placed:
                visible[window] &= ~mask
            visible = np.zeros(canvas.shape[:2], bool)
            visible[window] = mask
            placed.append((attrs, int(mask.sum()), visible))
            return


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def make_scene(world: ToyWorld, index: int, seed: int = 0, split: str = "train") -> Record:
    """Scene `index` of the (seed, split) stream, as a record."""
    by_shape = _choices(world, split)
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    background = world.backgrounds[rng.integers(len(world.backgrounds))]
    canvas = _background(world, background, rng)
    count = rng.integers(1, min(world.max_subjects, len(by_shape)) + 1)
    placed: list = []
    for shape in rng.choice(sorted(by_shape), size=count, replace=False):
        colour, pattern = by_shape[shape][rng.integers(len(by_shape[shape]))]
        size = world.sizes[rng.integers(len(world.sizes))]
        attrs = {"shape": str(shape), "colour": colour, "pattern": pattern, "size": size}
        _place(world, canvas, placed, attrs, rng)
    subjects = tuple(
        Subject(label=a["shape"], box=_bounding_box(m), mask=encode_mask(m), attributes=a)
        for a, _, m in placed
    )
    return Record(
        image=encode_image(np.clip(np.round(canvas), 0, 255).astype(np.uint8)),
        caption=caption([a for a, _, _ in placed], background),
        source_id=f"toy/{split}/{seed}/{index}",
        width=world.size,
        height=world.size,
        subjects=subjects,
        attributes={"background": background, "split": split},
    )


def generate(
    world: ToyWorld, n: int, seed: int = 0, split: str = "train", start: int = 0
) -> Iterator[Record]:
    """Scenes `start .. start + n - 1` of the (seed, split) stream."""
    return (make_scene(world, i, seed, split) for i in range(start, start + n))


def encoded_scenes(world: ToyWorld, seed: int, split: str, span: tuple[int, int]) -> list[bytes]:
    """Scenes `span[0] .. span[1] - 1`, encoded: the unit of work of generator processes."""
    return [make_scene(world, i, seed, split).encode() for i in range(*span)]
