"""`sdjax export CHECKPOINT OUT_DIR [--format diffusers|sdjax] [--raw-weights]`.

diffusers (default): PyTorch formats (see `sdjax.export`); sdjax: a native pipeline folder
(model.json + params.safetensors) that `sdjax.load_pipeline(OUT_DIR)` reads. CHECKPOINT and
OUT_DIR may be `gs://` URLs.
"""

from __future__ import annotations


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
    import contextlib

    from sdjax import paths
    from sdjax.errors import UserError

    if paths.listdir(args.out):
        raise UserError(f"output folder {args.out} is not empty")
    pipeline = _load(args.checkpoint, use_ema=False if args.raw_weights else None)
    remote = paths.is_remote(args.out)
    # The writers (safetensors, diffusers/transformers layouts) need a local folder: a
    # bucket's export is written to a staging folder and uploaded.
    with paths.staging_dir("sdjax-export-") if remote else contextlib.nullcontext(args.out) as out:
        if args.format == "sdjax":
            from sdjax.pipeline import save_pipeline

            save_pipeline(pipeline, out)
        else:
            from sdjax.export import export_pipeline

            export_pipeline(pipeline, out)
        if remote:
            paths.upload_tree(out, args.out)
    print(f"exported {args.checkpoint} to {args.out}")
    return 0


def _load(path: str, use_ema: bool | None):
    """A pipeline from a training checkpoint or pipeline folder, local or gs://."""
    from sdjax import paths
    from sdjax.checkpoint import is_training_checkpoint, pipeline_from_training
    from sdjax.pipeline import load_pipeline

    if not paths.is_remote(path):
        return load_pipeline(path, use_ema=use_ema)
    if is_training_checkpoint(path):
        return pipeline_from_training(path, use_ema)
    with paths.staging_dir("sdjax-pipeline-") as local:
        paths.download_tree(path, local)
        return load_pipeline(local, use_ema=use_ema)
