"""`sdjax export CHECKPOINT OUT_DIR` (see `sdjax.export`)."""

from __future__ import annotations

import os


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a trained model in diffusers/transformers formats")
    p.add_argument("checkpoint", help="training workdir (latest step), step folder or pipeline")
    p.add_argument("out", help="output folder")
    p.set_defaults(run=run)


def run(args) -> int:
    from sdjax.errors import UserError
    from sdjax.pipeline import load_pipeline

    if os.path.exists(args.out) and os.listdir(args.out):
        raise UserError(f"output folder {args.out} is not empty")
    from sdjax.export import export_pipeline

    export_pipeline(load_pipeline(args.checkpoint), args.out)
    print(f"exported {args.checkpoint} to {args.out}")
    return 0
