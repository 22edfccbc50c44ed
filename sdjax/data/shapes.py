"""The toy world's drawing primitives: shapes as signed distances, patterns as ink coverage.

`SHAPES[name](u, v)` gives the signed distance (negative inside) from points `(u, v)` to
the shape's outline, in units of the subject's radius; `u` points right, `v` down, the
shape is centred on the origin and fits in a circle of radius 1.1. Multiplied by the radius
in pixels, `0.5 - distance` clipped to [0, 1] is the pixel's anti-aliased coverage and
`distance < 0` the exact mask.

`PATTERNS[name](u, v, period)` gives the share of each pixel (coordinates in pixels) covered
by the pattern's ink, anti-aliased the same way; `period` is the pattern's repeat in pixels.
"""

from __future__ import annotations

import math

import numpy as np


def _polygon(vertices: np.ndarray):
    """Signed distance to a simple polygon: nearest edge, sign by even-odd crossings."""
    # Edges run along a leading axis [N, 1, 1]: reducing over it is elementwise, so fast.
    a = vertices.astype(np.float32)[:, :, None, None]
    b = np.roll(a, -1, axis=0)
    ax, ay, by, ex, ey = a[:, 0], a[:, 1], b[:, 1], b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]
    inv_len2 = 1.0 / (ex * ex + ey * ey)
    # Horizontal edges never cross a horizontal ray; a 1 avoids dividing by their zero dy.
    slope = ex / np.where(ey == 0, 1, ey)

    def sdf(u, v):
        wx, wy = u - ax, v - ay
        t = np.clip((wx * ex + wy * ey) * inv_len2, 0.0, 1.0)
        dist = np.sqrt(((wx - t * ex) ** 2 + (wy - t * ey) ** 2).min(0))
        # Compared as coordinates (not differences) so edges sharing a vertex agree on it.
        straddles = (ay > v) != (by > v)
        crossings = (straddles & (wx < wy * slope)).sum(0)
        return np.where(crossings % 2 == 1, -dist, dist)

    return sdf


def _box(half_w: float, half_h: float):
    def sdf(u, v):
        qx, qy = np.abs(u) - half_w, np.abs(v) - half_h
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        return outside + np.minimum(np.maximum(qx, qy), 0)

    return sdf


def _star(points: int, inner: float) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


def _heart(half_diagonal: float = 0.87, centre: float = 0.09):
    """A square standing on a corner with a disc on each upper side: a heart, centred."""
    lobe = half_diagonal / 2
    square = _box(half_diagonal / math.sqrt(2), half_diagonal / math.sqrt(2))

    def sdf(u, v):
        y = v - centre
        body = square((u + y) / math.sqrt(2), (y - u) / math.sqrt(2))
        lobes = np.hypot(np.abs(u) - lobe, y + lobe) - half_diagonal / math.sqrt(2)
        return np.minimum(body, lobes)

    return sdf


def _triangle() -> np.ndarray:
    angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    # Scaled and lowered so its bounding box is centred and about as tall as a circle's.
    return np.stack([np.cos(angles), np.sin(angles) + 0.25], 1) * 1.2


_cross_arms = (_box(0.95, 0.32), _box(0.32, 0.95))

SHAPES = {
    "circle": lambda u, v: np.hypot(u, v) - 0.95,
    "square": _box(0.78, 0.78),
    "triangle": _polygon(_triangle()),
    "star": _polygon(_star(5, 0.45) * 1.08),
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 0.7) - 0.27,
    "cross": lambda u, v: np.minimum(_cross_arms[0](u, v), _cross_arms[1](u, v)),
    "diamond": _polygon(np.array([[0, -1.05], [0.7, 0], [0, 1.05], [-0.7, 0]])),
    "heart": _heart(),
}


def _coverage(distance):
    """Anti-aliased share of a pixel inside a region, from its signed distance in pixels."""
    return np.clip(0.5 - distance, 0.0, 1.0)


def _stripes(u, v, period):
    phase = (u + v) / math.sqrt(2) / period  # diagonal, so stripes never align with a box
    return _coverage(period * (np.abs(phase - np.floor(phase) - 0.5) - 0.25))


def _dots(u, v, period):
    # Dots sit between the lattice lines, so a small subject shows four, not one in the middle.
    du = u - period * (np.floor(u / period) + 0.5)
    dv = v - period * (np.floor(v / period) + 0.5)
    return _coverage(np.hypot(du, dv) - 0.3 * period)


def _checks(u, v, period):
    cell = period / 2
    fu, fv = u / cell - np.floor(u / cell), v / cell - np.floor(v / cell)
    to_edge = cell * np.minimum(0.5 - np.abs(fu - 0.5), 0.5 - np.abs(fv - 0.5))
    inked = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 1
    return _coverage(np.where(inked, -to_edge, to_edge))


PATTERNS = {
    "solid": lambda u, v, period: np.zeros_like(u),
    "striped": _stripes,
    "dotted": _dots,
    "checkered": _checks,
}
