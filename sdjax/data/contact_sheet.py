"""Contact sheet: a grid of a record folder's samples for a person to look at.

Each tile shows the image at about 192 px (small images enlarged by a whole factor, nearest
neighbour, so pixels stay honest) with every subject's box, label and score, beside it the
subjects' masks in distinct colours at half that size, and the source id and caption below.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sdjax.data.records import Record, mask_array
from sdjax.errors import UserError

_MASK_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]
_FONT_SIZE = 11
_LINE_HEIGHT = 13
_CAPTION_LINES = 4
_PAD = 6
_TILE_SIDE = 192  # pixels


def _resized(image: Image.Image, scale: float) -> Image.Image:
    # Enlarged by whole numbers with nearest neighbour so pixels stay honest; shrunk smoothly.
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)


def _with_boxes(record: Record, scale: float, font) -> Image.Image:
    with Image.open(io.BytesIO(record.image)) as im:
        image = _resized(im.convert("RGB"), scale)
    draw = ImageDraw.Draw(image)
    for subject in record.subjects:
        x1, y1, x2, y2 = (v * scale for v in subject.box)
        # Drawn just outside the box, black under white, so it hides no subject pixel and
        # reads on any background.
        draw.rectangle([x1 - 2, y1 - 2, x2 + 1, y2 + 1], outline=(0, 0, 0), width=2)
        draw.rectangle([x1 - 1, y1 - 1, x2, y2], outline=(255, 255, 255))
        text_y = y1 - _FONT_SIZE - 4 if y1 >= _FONT_SIZE + 4 else y2 + 3
        label = f"{subject.label} {subject.score:.2f}"
        draw.text((x1, text_y), label, fill="white", font=font, stroke_width=1, stroke_fill="black")
    return image


def _mask_map(record: Record, scale: float) -> Image.Image:
    canvas = np.zeros((record.height, record.width, 3), np.uint8)
    for i, subject in enumerate(record.subjects):
        canvas[mask_array(subject)] = _MASK_COLOURS[i % len(_MASK_COLOURS)]
    return _resized(Image.fromarray(canvas), scale)


def contact_sheet(records: Sequence[Record], columns: int = 8) -> Image.Image:
    """The records as a grid of tiles (image with boxes | masks, caption below)."""
    font = ImageFont.load_default(size=_FONT_SIZE)
    scales = [_TILE_SIDE / max(r.width, r.height) for r in records]
    scales = [round(s) if s >= 1 else s for s in scales]
    width = max(round(r.width * s) for r, s in zip(records, scales))
    height = max(round(r.height * s) for r, s in zip(records, scales))
    tile_w = width + width // 2 + 3 * _PAD
    tile_h = height + (_CAPTION_LINES + 1) * _LINE_HEIGHT + _PAD
    rows = -(-len(records) // columns)
    sheet = Image.new("RGB", (columns * tile_w, rows * tile_h), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    wrap_at = int((tile_w - 2 * _PAD) / font.getlength("n"))
    for i, (record, scale) in enumerate(zip(records, scales)):
        x, y = (i % columns) * tile_w + _PAD, (i // columns) * tile_h + _PAD
        sheet.paste(_with_boxes(record, scale, font), (x, y))
        sheet.paste(_mask_map(record, scale / 2), (x + width + _PAD, y))
        lines = textwrap.wrap(f"{record.source_id}: {record.caption}", wrap_at)
        draw.multiline_text(
            (x, y + height + 3), "\n".join(lines[:_CAPTION_LINES]), fill="black", font=font
        )
    return sheet


def write_contact_sheet(root: str, out_path: str, n: int = 64, columns: int = 8) -> int:
    """Writes up to `n` records of a record folder, evenly spaced, as a sheet; returns how many."""
    from sdjax.data.shards import RecordSource

    source = RecordSource(root)
    picks = np.unique(np.linspace(0, len(source) - 1, min(n, len(source))).round().astype(int))
    records = [r for r in (source[int(i)] for i in picks) if r is not None]
    if not records:
        raise UserError(f"{root}: no intact records to show")
    contact_sheet(records, columns=min(columns, len(records))).save(out_path)
    return len(records)
