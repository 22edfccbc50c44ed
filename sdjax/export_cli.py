"""`sdjax export CHECKPOINT OUT_DIR [--format diffusers|sdjax] [--raw-weights]`.

diffusers (default): PyTorch formats (see `sdjax.export`); sdjax: a native pipeline folder
(model.json + params.safetensors) that `sdjax.load_pipeline(OUT_DIR)` reads.
"""

from __future__ import annotations

import os


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a trained model in diffusers/transformers formats")
    p.add_argument("checkpoint", help="training workdir (latest step), step folder or pipeline")
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--format",
        choices=("diffusers", "sdjax"),
        default="diffusers",
        help="diffusers/transformers folders (default) or an sdjax pipeline folder",
    )
    p.add_argument(
        "--raw-weights",
        action="store_true",
        help="from a training checkpoint, the trained weights rather than their EMA",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from sdjax.errors import UserError
    from sdjax.pipeline import load_pipeline

    if os.path.exists(args.out) and os.listdir(args.out):
        raise UserError(f"output folder {args.out} is not empty")
    pipeline = load_pipeline(args.checkpoint, use_ema=False if args.raw_weights else None)
    if args.format == "sdjax":
        from sdjax.pipeline import save_pipeline

        save_pipeline(pipeline, args.out)
    else:
        from sdjax.export import export_pipeline

        export_pipeline(pipeline, args.out)
    print(f"exported {args.checkpoint} to {args.out}")
    return 0
