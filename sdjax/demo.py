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


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="personalise held-out toy subjects with the embedded model")
    p.add_argument("--out", default="out/demo", metavar="DIR", help="output folder")
    p.add_argument("--checkpoint", metavar="DIR", help="another model (default: the embedded)")
    p.add_argument("--cases", type=int, default=8, help="scenes to draw (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    p.set_defaults(run=run)


def run(args) -> int:
    start = time.perf_counter()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out is a file, not a folder: {args.out}")
    from sdjax.convert.files import write_json
    from sdjax.eval.toy import generate_cases
    from sdjax.eval.toy_metrics import write_sheet
    from sdjax.pipeline import load_pipeline

    pipeline = load_pipeline(args.checkpoint)
    made = generate_cases(
        pipeline, n_cases=args.cases, seed=args.seed, steps=args.steps, desc="demo"
    )
    os.makedirs(args.out, exist_ok=True)
    sheet = os.path.join(args.out, "demo.png")
    cases = made["cases"]
    write_sheet(sheet, cases, made["boxes"], made["images"], made["references"], len(cases))
    seconds = time.perf_counter() - start
    write_json(
        os.path.join(args.out, "demo.json"),
        {
            "model": args.checkpoint or "embedded",
            "settings": made["settings"],
            "cases": [
                {"prompt": c.prompt, "kind": c.kind, "subjects": list(c.subjects), "boxes": b}
                for c, b in zip(cases, made["boxes"])
            ],
            "seconds": {"sampling": round(made["seconds"], 1), "total": round(seconds, 1)},
        },
    )
    print(f"wrote {sheet}: {len(cases)} scenes of held-out subjects in {seconds:.0f} s")
    return 0
