"""DreamBench tables and results page of an evaluation folder (see `sdjax.eval.dreambench`).

- `write_tables(out)`: per mode that has results, `OUT/<mode>.md` (the paper-format table
  method | DINO | CLIP-I | CLIP-T: our row, then published rows, each marked with the
  paper it is quoted from (docs/method.md §7); then one row per subject) and
  `OUT/<mode>.json` (the same numbers, the coverage and the run's settings). Modes:
  "single" and "pairs".
- `write_report(out)`: `OUT/report/index.html`, one self-contained page (inline CSS, no
  script): the tables, then per subject (or pair) its reference photo(s), for a pair the
  boxes, and per prompt a row of its generated images with the prompt's scores. Images are
  referenced relative to the page (`../images/...`, `../references/...`), so the page
  opens from disk with no server, and the results folder can be moved as a whole.

A prompt's score is the mean over its images, a subject's the mean over its prompts, the
overall score the mean over subjects (over all images when every subject is complete).
"""

from __future__ import annotations

import html
import json
import os
from statistics import fmean
from urllib.parse import quote

from sdjax.convert.files import read_json
from sdjax.errors import UserError
from sdjax.eval.dreambench import RESULTS, SETTINGS, read_results

MODES = ("single", "pairs")
TITLES = {"single": "Single subject", "pairs": "Two subjects"}
UNITS = {"single": "subjects", "pairs": "pairs"}
METRICS = {
    "dino": "DINO",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "clip_i_l14": "CLIP-I L/14",
    "clip_t_l14": "CLIP-T L/14",
}
FULL = {"single": (30, 25), "pairs": (30, 10)}  # subjects (pairs) x prompts of the benchmark
# Published rows are quoted, never measured here; each is marked with its source.
SOURCES = {
    "*": "quoted from the Subject-Diffusion paper (arXiv 2307.11410), not measured here",
    "†": "quoted from the UNO paper (Wu et al., arXiv 2504.02160), not measured here",
}
# (method, DINO, CLIP-I, CLIP-T, source mark); CLIP is ViT-B/32 in these papers.
PAPER = {
    "single": (
        ("real images", 0.774, 0.885, None, "*"),
        ("DreamBooth (fine-tunes)", 0.668, 0.803, 0.305, "*"),
        ("IP-Adapter (SD1.5)", 0.667, 0.813, 0.289, "*"),
        ("BLIP-Diffusion", 0.594, 0.779, 0.300, "*"),
        ("ELITE", 0.621, 0.771, 0.293, "*"),
        ("Subject-Diffusion", 0.711, 0.787, 0.293, "*"),
        ("UNO (FLUX, 2025)", 0.760, 0.835, 0.304, "†"),
    ),
    "pairs": (
        ("Subject-Diffusion", 0.506, 0.696, 0.310, "*"),
        ("UNO (FLUX, 2025)", 0.542, 0.733, 0.322, "†"),
    ),
}


def source_notes(mode: str) -> list[str]:
    """'* quoted from ...' for each source the mode's published rows cite."""
    marks = dict.fromkeys(row[-1] for row in PAPER[mode])
    return [f"{mark} {SOURCES[mark]}." for mark in marks]


OURS = "ours (sdjax)"


def prompt_scores(record: dict) -> dict[str, float]:
    """A results record's scores averaged over its images."""
    return {key: fmean(values) for key, values in record["scores"].items()}


def summarise(records: list[dict], mode: str) -> dict | None:
    """Per-subject and overall means of one mode's records (None when it has none)."""
    rows = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["prompt_index"])
    if not rows:
        return None
    metrics = [k for k in METRICS if all(k in r["scores"] for r in rows)]
    by_name: dict[str, list[dict]] = {}
    for record in rows:
        by_name.setdefault(record["name"], []).append(record)
    subjects = {name: _subject_summary(group, metrics) for name, group in by_name.items()}
    names, prompts = FULL[mode]
    complete = len(subjects) == names and all(s["prompts"] == prompts for s in subjects.values())
    return {
        "mode": mode,
        "metrics": metrics,
        "overall": {k: fmean(s[k] for s in subjects.values()) for k in metrics},
        "coverage": {
            "subjects": len(subjects),
            "prompts": len(rows),
            "images": sum(s["images"] for s in subjects.values()),
            "complete": complete,
        },
        "subjects": subjects,
    }


def _subject_summary(records: list[dict], metrics: list[str]) -> dict:
    means = [prompt_scores(r) for r in records]
    return {
        "subjects": records[0]["subjects"],
        "labels": records[0]["labels"],
        "prompts": len(records),
        "images": sum(len(r["images"]) for r in records),
        **{k: fmean(m[k] for m in means) for k in metrics},
    }


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def comparison_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): our overall row, then the published rows (each marked with its
    source, `SOURCES`)."""
    metrics = summary["metrics"]
    rows = [[OURS, *(_number(summary["overall"][k]) for k in metrics)]]
    for method, *values, mark in PAPER[summary["mode"]]:
        quoted = dict(zip(("dino", "clip_i", "clip_t"), values))
        rows.append([f"{method} {mark}", *(_number(quoted.get(k)) for k in metrics)])
    return ["method", *(METRICS[k] for k in metrics)], rows


def subject_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per subject (or pair)."""
    metrics = summary["metrics"]
    rows = [
        [name, " + ".join(s["labels"]), str(s["prompts"]), str(s["images"])]
        + [_number(s[k]) for k in metrics]
        for name, s in summary["subjects"].items()
    ]
    return ["subject", "class", "prompts", "images", *(METRICS[k] for k in metrics)], rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _describe(summary: dict, settings: dict) -> list[str]:
    """Sentences naming what our row measured."""
    mode, cov = summary["mode"], summary["coverage"]
    names, prompts = FULL[mode]
    l14 = f", L/14 columns {settings['clip_l14']}" if settings.get("clip_l14") else ""
    return [
        f"Ours: {cov['subjects']} of {names} {UNITS[mode]}, {cov['prompts']} of "
        f"{names * prompts} prompts, {cov['images']} images"
        + ("." if cov["complete"] else " (partial)."),
        f"Checkpoint {settings.get('checkpoint') or 'embedded default'}, "
        f"{settings.get('steps')} steps, seed {settings.get('seed')}, "
        f"text scale {settings.get('text_scale')}, image scale {settings.get('image_scale')}.",
        f"DINO {settings.get('dino')}; CLIP {settings.get('clip_b32')}{l14}.",
    ]


def write_tables(out: str) -> list[str]:
    """OUT/<mode>.md and OUT/<mode>.json for each mode with results -> the paths written."""
    records, settings = read_results(out), _settings(out)
    written = []
    for mode in MODES:
        summary = summarise(records, mode)
        if summary is None:
            continue
        lines = [f"# DreamBench: {TITLES[mode].lower()}", "", *_describe(summary, settings), ""]
        lines += _markdown_table(*comparison_table(summary))
        notes = [note.replace("*", "\\*", 1) for note in source_notes(mode)]
        lines += ["", *notes, "", f"## Per {UNITS[mode][:-1]}", ""]
        lines += _markdown_table(*subject_table(summary))
        paths = [os.path.join(out, f"{mode}.{ext}") for ext in ("md", "json")]
        with open(paths[0], "w") as f:
            f.write("\n".join(lines) + "\n")
        paper = [
            {**dict(zip(("method", "dino", "clip_i", "clip_t"), row)), "source": SOURCES[row[-1]]}
            for row in PAPER[mode]
        ]
        document = {**summary, "settings": settings, "paper": paper}
        with open(paths[1], "w") as f:
            json.dump(document, f, indent=2)
        written += paths
    return written


def _settings(out: str) -> dict:
    path = os.path.join(out, SETTINGS)
    return read_json(path) if os.path.isfile(path) else {}


STYLE = """
body { font: 14px/1.4 sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.ours { font-weight: bold; background: #eef6ee; }
.note { color: #666; }
section { border-top: 1px solid #ddd; margin-top: 1.5em; }
.refs { display: flex; gap: 12px; align-items: flex-start; }
figure { margin: 0; text-align: center; font-size: 12px; }
.refs img { width: 160px; height: 160px; object-fit: contain; border: 3px solid; }
.refs .c0 { border-color: #d33; } .refs .c1 { border-color: #36c; }
.boxes { position: relative; width: 160px; height: 160px; border: 1px solid #999; }
.boxes div { position: absolute; border: 2px solid; box-sizing: border-box; }
table.grid td, table.grid th { border: none; padding: 2px; vertical-align: middle; }
table.grid th { width: 220px; font-weight: normal; text-align: left; }
table.grid img { width: 128px; height: 128px; object-fit: contain; background: #f4f4f4; }
"""


def _esc(text) -> str:
    return html.escape(str(text))


def _src(path: str) -> str:
    """A path relative to OUT as a URL relative to OUT/report/index.html."""
    return _esc("../" + quote(path))


def _html_table(header, rows, row_class=lambda row: "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        f'<tr class="{row_class(row)}">' + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _scores_line(scores: dict, metrics: list[str]) -> str:
    return " &middot; ".join(f"{METRICS[k]} {_number(scores[k])}" for k in metrics)


def _subject_section(mode: str, name: str, records: list[dict], metrics: list[str]) -> str:
    first = records[0]
    refs = [
        f'<figure><img class="c{i}" src="{_src(path)}" alt="reference of {_esc(subject)}">'
        f"<figcaption>{_esc(subject)} ({_esc(label)})</figcaption></figure>"
        for i, (path, subject, label) in enumerate(
            zip(first["references"], first["subjects"], first["labels"])
        )
    ]
    if len(first["subjects"]) > 1:
        boxes = "".join(
            f'<div class="c{i}" style="left:{x1:.1%};top:{y1:.1%};'
            f'width:{x2 - x1:.1%};height:{y2 - y1:.1%}"></div>'
            for i, (x1, y1, x2, y2) in enumerate(first["boxes"])
        )
        refs.append(
            f'<figure><div class="boxes">{boxes}</div><figcaption>boxes</figcaption></figure>'
        )
    rows = [
        f"<tr><th>{r['prompt_index']}: {_esc(r['prompt'])}<br>"
        f'<span class="note">{_scores_line(prompt_scores(r), metrics)}</span></th>'
        + "".join(
            f'<td><a href="{_src(p)}"><img src="{_src(p)}" loading="lazy" alt="{_esc(p)}"></a></td>'
            for p in r["images"]
        )
        + "</tr>"
        for r in records
    ]
    return (
        f'<section id="{_esc(mode)}-{_esc(name)}"><h3>{_esc(name)}</h3>'
        f'<div class="refs">{"".join(refs)}</div><table class="grid">{"".join(rows)}</table>'
        "</section>"
    )


def _mode_section(mode: str, records: list[dict], settings: dict) -> str:
    summary = summarise(records, mode)
    ours = lambda row: "ours" if row[0] == OURS else ""
    parts = [
        f"<h2>{TITLES[mode]}</h2>",
        *(f'<p class="note">{_esc(s)}</p>' for s in _describe(summary, settings)),
        _html_table(*comparison_table(summary), row_class=ours),
        *(f'<p class="note">{_esc(note)}</p>' for note in source_notes(mode)),
        _html_table(*subject_table(summary)),
    ]
    mine = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["prompt_index"])
    for name in summary["subjects"]:
        group = [r for r in mine if r["name"] == name]
        parts.append(_subject_section(mode, name, group, summary["metrics"]))
    return "\n".join(parts)


def write_report(out: str) -> str:
    """OUT/report/index.html (see the module doc) -> its path."""
    records = read_results(out)
    if not records:
        raise UserError(f"no DreamBench results in {os.path.join(out, RESULTS)}")
    settings = _settings(out)
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>DreamBench results</title><style>{STYLE}</style></head><body>"
        "<h1>DreamBench results</h1>\n"
        + "\n".join(_mode_section(mode, records, settings) for mode in modes)
        + "\n</body></html>\n"
    )
    folder = os.path.join(out, "report")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "index.html")
    with open(path, "w") as f:
        f.write(page)
    return path
