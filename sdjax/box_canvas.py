"""The box canvas of `sdjax app`: a square standing for the output frame, on which each
subject's box is dragged with the mouse. A `gr.HTML` component (`canvas`) whose value is
JSON {"boxes": [[x1, y1, x2, y2] in [0, 1] or null, ...], "active": k}: a drag draws
subject k's box and fires `input`; the page's box fields and the canvas follow each other
(`box_texts`, `canvas_from_texts`). Its template is a JS template literal over the value.
"""

from __future__ import annotations

import json

import gradio as gr

from sdjax.errors import UserError
from sdjax.subjects import parse_box

CANVAS_PX = 320  # the output frame's size on the page
COLOURS = ("#e6194b", "#3cb44b", "#4363d8")  # subject k's box

CANVAS_TEMPLATE = """
<div class="sdjax-tools">Draw the box of subject
${[...Array(JSON.parse(value).boxes.length).keys()].map(k =>
  `<button type="button" data-subject="${k}" class="${JSON.parse(value).active === k ? 'on' : ''}"
    style="border-color:${COLOURS[k]}">${k + 1}</button>`).join('')}
<button type="button" data-clear="1">clear</button></div>
<div class="sdjax-frame" style="width:${SIZE}px;height:${SIZE}px">
${JSON.parse(value).boxes.map((b, k) => b ? `<div class="sdjax-box" data-box="${k}"
  style="left:${b[0] * 100}%;top:${b[1] * 100}%;width:${(b[2] - b[0]) * 100}%;
  height:${(b[3] - b[1]) * 100}%;border-color:${COLOURS[k]}">${k + 1}</div>` : '').join('')}
<div class="sdjax-drag"></div></div>
"""
CANVAS_CSS = """
.sdjax-frame { position: relative; background: #f3f3f3; border: 1px solid #999;
  cursor: crosshair; touch-action: none; user-select: none; }
.sdjax-box, .sdjax-drag { position: absolute; border: 2px solid; box-sizing: border-box;
  font: bold 12px sans-serif; padding: 1px 3px; pointer-events: none; }
.sdjax-drag { display: none; border-style: dashed; border-color: #333; }
.sdjax-tools button { margin: 0 2px 6px; padding: 1px 8px; border: 2px solid; }
.sdjax-tools button.on { font-weight: bold; background: #ddd; }
"""
CANVAS_JS = """
const clip = (v) => Math.min(1, Math.max(0, v));
const state = () => JSON.parse(props.value);
const publish = (v) => { props.value = JSON.stringify(v); trigger('input'); };
const at = (e) => {
  const r = element.querySelector('.sdjax-frame').getBoundingClientRect();
  return [clip((e.clientX - r.left) / r.width), clip((e.clientY - r.top) / r.height)];
};
let start = null;
element.addEventListener('click', (e) => {
  const b = e.target.closest('button');
  if (!b) return;
  const v = state();
  if (b.dataset.clear) v.boxes[v.active] = null; else v.active = Number(b.dataset.subject);
  publish(v);
});
element.addEventListener('pointerdown', (e) => {
  const frame = e.target.closest('.sdjax-frame');
  if (!frame) return;
  start = at(e);
  frame.setPointerCapture(e.pointerId);
  e.preventDefault();
});
element.addEventListener('pointermove', (e) => {
  if (!start) return;
  const [x, y] = at(e), d = element.querySelector('.sdjax-drag');
  Object.assign(d.style, { display: 'block',
    left: `${Math.min(start[0], x) * 100}%`, top: `${Math.min(start[1], y) * 100}%`,
    width: `${Math.abs(x - start[0]) * 100}%`, height: `${Math.abs(y - start[1]) * 100}%` });
});
element.addEventListener('pointerup', (e) => {
  if (!start) return;
  const [x, y] = at(e), s = start;
  start = null;
  element.querySelector('.sdjax-drag').style.display = 'none';
  if (Math.abs(x - s[0]) < 0.02 || Math.abs(y - s[1]) < 0.02) return;  // a click, not a box
  const r = (t) => Math.round(t * 10000) / 10000;
  const v = state();
  v.boxes[v.active] = [r(Math.min(s[0], x)), r(Math.min(s[1], y)), r(Math.max(s[0], x)),
                       r(Math.max(s[1], y))];
  v.active = Math.min(v.active + 1, v.boxes.length - 1);
  publish(v);
});
"""


def canvas(slots: int, elem_id: str = "frame") -> gr.HTML:
    """The canvas for `slots` subjects, every box empty."""
    colours = "[" + ",".join(f"'{c}'" for c in COLOURS) + "]"
    template = CANVAS_TEMPLATE.replace("${SIZE}", str(CANVAS_PX)).replace(
        "COLOURS[k]", f"{colours}[k]"
    )
    return gr.HTML(
        canvas_value([None] * slots),
        html_template=template,
        css_template=CANVAS_CSS,
        js_on_load=CANVAS_JS,
        elem_id=elem_id,
    )


def canvas_value(boxes: list, active: int = 0) -> str:
    """The canvas's value (module doc) for `boxes` (each None or 4 numbers)."""
    return json.dumps({"boxes": [None if b is None else list(b) for b in boxes], "active": active})


def box_texts(value: str) -> list[str]:
    """The canvas's boxes as the page's box fields ("x1, y1, x2, y2"; "" = automatic)."""
    boxes = json.loads(value)["boxes"]
    return ["" if b is None else ", ".join(f"{v:.4g}" for v in b) for b in boxes]


def canvas_from_texts(value: str, *texts: str) -> str:
    """The canvas after the box fields were edited by hand (a field that is not a box yet,
    mid-typing, shows no box; `generate` reports it if it stays so)."""
    boxes = []
    for text in texts:
        try:
            boxes.append(parse_box(text) if text.strip() else None)
        except UserError:
            boxes.append(None)
    return canvas_value(boxes, json.loads(value)["active"])
