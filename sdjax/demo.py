"""`sdjax demo`: the main job on the embedded default model.

Personalised generation for subjects the model never saw in training (the toy world's
held-out attribute combinations): one and two subjects, with requested boxes and placed by
the sampler, each with its own prompt. Writes OUT/demo.png — per case the reference(s),
the requested box, the result and the same model without its subjects (text only) — and
OUT/demo.json (prompts, boxes, settings, seconds).
"""

from __future__ import annotations

import os
import time

from sdjax.errors import UserError


def run_demo(
    out: str, checkpoint: str | None = None, cases: int = 8, seed: int = 0, steps: int = 25
) -> str:
    """Draw the demo sheet (module docstring) into the folder `out` -> the sheet's path."""
    start = time.perf_counter()
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out is a file, not a folder: {out}")
    from sdjax.convert.files import write_json
    from sdjax.eval.toy import generate_cases
    from sdjax.eval.toy_metrics import write_sheet
    from sdjax.pipeline import load_pipeline

    pipeline = load_pipeline(checkpoint)
    made = generate_cases(pipeline, n_cases=cases, seed=seed, steps=steps, desc="demo")
    os.makedirs(out, exist_ok=True)
    sheet = os.path.join(out, "demo.png")
    drawn = made["cases"]
    write_sheet(sheet, drawn, made["boxes"], made["images"], made["references"], len(drawn))
    seconds = time.perf_counter() - start
    write_json(
        os.path.join(out, "demo.json"),
        {
            "model": checkpoint or "embedded",
            "settings": made["settings"],
            "cases": [
                {"prompt": c.prompt, "kind": c.kind, "subjects": list(c.subjects), "boxes": b}
                for c, b in zip(drawn, made["boxes"])
            ],
            "seconds": {"sampling": round(made["seconds"], 1), "total": round(seconds, 1)},
        },
    )
    print(f"wrote {sheet}: {len(drawn)} scenes of held-out subjects in {seconds:.0f} s")
    return sheet
