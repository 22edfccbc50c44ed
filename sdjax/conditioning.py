"""Subject inputs shared by sampling and training: reference images, boxes, location mask.

- `reference_image`: the subject cut out by its mask onto white, cropped to the mask's
  box, padded square, resized to the image encoder's size and normalised (docs/method.md §5, §6):
  uint8 `[H, W, 3]` + bool `[H, W]` -> float32 `[S, S, 3]`.
- `auto_boxes`: boxes for subjects given without one: side by side, each with its
  reference's aspect ratio, not overlapping.
- `location_mask` (jnp, inside jit): the UNet's extra input channel (docs/method.md §3a): 1 outside
  every subject box, 0 inside any: boxes `[B, N, 4]` in [0, 1] -> `[B, h, w, 1]`.
- `subject_region`: where a subject may be drawn, for region-bound attention: its box, or
  its reference mask fitted into the box -> float32 `[h, w]`.
Boxes are `(x1, y1, x2, y2)` fractions of the output image; a pixel is in a box when its
centre is.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdjax.errors import UserError

WHITE = 255


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Pixel bounding box (x1, y1, x2, y2), x2/y2 exclusive, of a non-empty bool mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def segment_square(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The masked subject on white, cropped to its box and padded square (uint8)."""
    if not mask.any():
        raise UserError("subject mask is empty")
    x1, y1, x2, y2 = mask_box(mask)
    # Crop first: the cut-out then touches only the subject's box, not the whole photo.
    cut = np.where(mask[y1:y2, x1:x2, None], image[y1:y2, x1:x2], np.uint8(WHITE))
    h, w = cut.shape[:2]
    side = max(h, w)
    square = np.full((side, side, 3), WHITE, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = cut
    return square


def normalise(image: np.ndarray, size: int, mean, std) -> np.ndarray:
    """uint8 `[H, W, 3]` -> bicubic `size` x `size`, `(x / 255 - mean) / std`, float32."""
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    x = image.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def reference_image(image: np.ndarray, mask: np.ndarray, size: int, mean, std) -> np.ndarray:
    """The image encoder's view of a subject: float32 `[size, size, 3]`."""
    return normalise(segment_square(image, mask), size, mean, std)


def box_pixels(box, size: int) -> np.ndarray:
    """bool `[size, size]`: pixels whose centre lies in the box (as the location mask)."""
    centres = (np.arange(size) + 0.5) / size
    inside_x = (centres >= box[0]) & (centres < box[2])
    inside_y = (centres >= box[1]) & (centres < box[3])
    return inside_y[:, None] & inside_x[None, :]


def subject_region(box, size: int, silhouette: np.ndarray | None = None) -> np.ndarray:
    """float32 `[size, size]` in {0, 1}: the box's pixels, or with `silhouette` (the
    subject's reference mask cropped to the mask's box, bool `[h, w]`) that silhouette
    stretched over them. Never empty: a box between pixel centres keeps its nearest pixel."""
    inside = box_pixels(box, size)
    if not inside.any():
        row = min(int((box[1] + box[3]) / 2 * size), size - 1)
        col = min(int((box[0] + box[2]) / 2 * size), size - 1)
        inside[row, col] = True
    if silhouette is None:
        return inside.astype(np.float32)
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    fitted = Image.fromarray(silhouette.astype(np.float32), "F").resize(
        (len(cols), len(rows)), Image.BILINEAR
    )
    region = np.zeros((size, size), np.float32)
    region[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = np.asarray(fitted) >= 0.5
    return region if region.any() else inside.astype(np.float32)


def auto_boxes(aspects: Sequence[float], fill: float = 0.75) -> list[tuple[float, ...]]:
    """Boxes for subjects with aspect ratios w/h `aspects`: one column each, left to right,
    centred in it; a box spans at most `fill` of the image (at most 0.9/n side by side)."""
    n = len(aspects)
    boxes = []
    for i, aspect in enumerate(aspects):
        cell_w, cell_h = min(fill, 0.9 / n), fill
        w = min(cell_w, cell_h * aspect)
        h = w / aspect
        cx, cy = (i + 0.5) / n, 0.5
        boxes.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    return boxes


def location_mask(boxes, valid, size: int):
    """1 outside every valid box, 0 inside any: boxes `[B, N, 4]`, valid `[B, N]` ->
    float32 `[B, size, size, 1]`. A latent pixel is inside when its centre is."""
    centres = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size
    x1, y1, x2, y2 = (boxes[..., k][..., None, None] for k in range(4))  # [B, N, 1, 1]
    inside_x = (centres[None, None, None, :] >= x1) & (centres[None, None, None, :] < x2)
    inside_y = (centres[None, None, :, None] >= y1) & (centres[None, None, :, None] < y2)
    inside = inside_x & inside_y & valid[..., None, None]  # [B, N, size, size]
    return jnp.prod(1.0 - inside.astype(jnp.float32), axis=1)[..., None]
