"""`sdjax eval toy|dreambench`: the command line of the evaluations.

    sdjax eval toy [--checkpoint DIR] [--cases N] [--seed S] [--steps N]
                   [--out results.json] [--sheet sheet.png]
    sdjax eval toy --train-classifier OUT [--seed S]     # rebuild the attribute reader
    sdjax eval dreambench --data DIR --dino PATH --clip-b32 PATH --out DIR [--report] ...

Every argument is checked before a model loads; the work is `sdjax.eval.toy`,
`sdjax.eval.dreambench` and `sdjax.eval.report` (imported when a command runs).
"""

from __future__ import annotations

import argparse
import os
import time

from sdjax.errors import UserError


def add_parser(sub) -> None:
    """Adds `eval` with its benchmarks to the main parser's subparsers."""
    evaluate = sub.add_parser("eval", help="measure a model (toy world, DreamBench)")
    benchmarks = evaluate.add_subparsers(
        dest="benchmark", required=True, parser_class=type(evaluate)
    )
    _add_toy(benchmarks)
    _add_dreambench(benchmarks)


def _add_toy(sub) -> None:
    p = sub.add_parser("toy", help="measure personalisation on held-out toy subjects")
    p.add_argument("--checkpoint", metavar="DIR", help="pipeline or workdir (default: embedded)")
    p.add_argument(
        "--raw-weights",
        action="store_true",
        help="with a training workdir: its trained weights, not their EMA",
    )
    p.add_argument("--cases", type=int, default=100, help="number of cases (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    p.add_argument("--text-scale", type=float, help="text guidance (default: the model's)")
    p.add_argument("--image-scale", type=float, help="image guidance (default: the model's)")
    p.add_argument("--batch-size", type=int, default=16, help="images per sampling call")
    p.add_argument("--classifier", metavar="DIR", help="attribute classifier (default: shipped)")
    p.add_argument("--out", metavar="results.json", help="write the full report as JSON")
    p.add_argument("--sheet", metavar="sheet.png", help="write a picture of the first cases")
    p.add_argument(
        "--train-classifier",
        metavar="OUT",
        help="instead: train the attribute classifier (from --seed) and save it in OUT",
    )
    p.add_argument(
        "--classifier-steps", type=int, default=None, help="with --train-classifier (default 2500)"
    )
    p.set_defaults(run=_toy)


def _check_output(path: str | None) -> None:
    if not path:
        return
    if os.path.isdir(path) and not path.endswith(os.sep):
        raise UserError(f"output {path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"output folder does not exist: {folder}")


def _toy(args) -> int:
    for path in (args.out, args.sheet):
        _check_output(path)
    if args.train_classifier:
        folder = os.path.dirname(os.path.abspath(args.train_classifier))
        if not os.path.isdir(folder):
            raise UserError(f"output folder does not exist: {folder}")
        return _train_classifier(args)
    from sdjax.convert.files import write_json
    from sdjax.eval.toy import evaluate_toy
    from sdjax.eval.toy_classifier import load_classifier
    from sdjax.eval.toy_metrics import markdown_table
    from sdjax.pipeline import load_pipeline

    classifier = load_classifier(args.classifier)
    report = evaluate_toy(
        load_pipeline(args.checkpoint, use_ema=False if args.raw_weights else None),
        n_cases=args.cases,
        seed=args.seed,
        steps=args.steps,
        text_scale=args.text_scale,
        image_scale=args.image_scale,
        classifier=classifier,
        batch_size=args.batch_size,
        sheet=args.sheet,
    )
    print(markdown_table(report))
    if args.out:
        write_json(args.out, report)
    return 0


def _train_classifier(args) -> int:
    from sdjax.eval import toy_classifier as tc

    steps = tc.TRAIN_STEPS if args.classifier_steps is None else args.classifier_steps
    if steps < 1:
        raise UserError(f"classifier steps must be at least 1, got {steps}")
    start = time.perf_counter()
    classifier, losses = tc.train_classifier(seed=args.seed, steps=steps)
    seconds = time.perf_counter() - start
    # Held-out renders: scenes of another seed's streams, boxes exact, no augmentation.
    accuracy = tc.classifier_accuracy(
        classifier, tc.make_crop_set(classifier.config, 1000, args.seed + 1)
    )
    info = {
        "seed": args.seed,
        "steps": steps,
        "seconds": round(seconds, 1),
        "final_loss": losses[-1],
        "heldout_accuracy": accuracy,
    }
    tc.save_classifier(classifier, args.train_classifier, info)
    print(f"saved the toy classifier in {args.train_classifier}: held-out accuracy {accuracy}")
    return 0


def _add_dreambench(sub) -> None:
    p = sub.add_parser("dreambench", help="DreamBench scores (DINO, CLIP-I, CLIP-T) of a model")
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="pipeline folder or training workdir (default: the embedded model)",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="DreamBench's dataset/ folder")
    clip = "transformers CLIPModel folder or open_clip .safetensors"
    p.add_argument(
        "--dino",
        required=True,
        metavar="PATH",
        help="DINO ViT-S/16: transformers ViTModel folder or timm .safetensors",
    )
    p.add_argument("--clip-b32", required=True, metavar="PATH", help=f"CLIP ViT-B/32: {clip}")
    p.add_argument("--clip-l14", metavar="PATH", help=f"optional CLIP ViT-L/14: {clip}")
    p.add_argument(
        "--open-clip-act",
        default="quick_gelu",
        choices=("quick_gelu", "gelu"),
        help="activation of open_clip safetensors files (quick_gelu: OpenAI's weights)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="results folder (resumable)")
    p.add_argument("--subjects", metavar="A,B", help="subjects to run (default: all 30)")
    p.add_argument(
        "--prompts-per-subject", type=int, metavar="K", help="the first K prompts (default: all)"
    )
    p.add_argument("--images-per-prompt", type=int, default=6, metavar="N")
    p.add_argument("--masks", metavar="DIR", help="optional DIR/<subject>.png reference masks")
    p.add_argument("--steps", type=int, default=50, metavar="N", help="DDIM steps")
    p.add_argument("--seed", type=int, default=0, metavar="N")
    p.add_argument("--text-scale", type=float, default=7.5, metavar="S")
    p.add_argument("--image-scale", type=float, default=1.5, metavar="S")
    p.add_argument("--subject-fraction", type=float, default=1.0, metavar="F")
    p.add_argument("--pairs", action="store_true", help="also the two-subject evaluation")
    p.add_argument("--report", action="store_true", help="also write OUT/report/index.html")
    p.set_defaults(run=_dreambench)


def dreambench_settings(args: argparse.Namespace):
    """Checked settings (metric files must exist: nothing is downloaded)."""
    from sdjax.eval.dreambench import Settings
    from sdjax.sampling import check_settings as check_sampler

    check_sampler(
        args.steps, args.text_scale, args.image_scale, args.images_per_prompt, args.subject_fraction
    )
    if args.prompts_per_subject is not None and args.prompts_per_subject < 1:
        raise UserError(f"--prompts-per-subject must be at least 1, got {args.prompts_per_subject}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file, not a folder")
    for flag in ("dino", "clip_b32", "clip_l14", "masks", "checkpoint"):
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path):
            raise UserError(
                f"--{flag.replace('_', '-')}: {path} not found (weights are not downloaded)"
            )
    absolute = {
        flag: os.path.abspath(getattr(args, flag)) if getattr(args, flag) else None
        for flag in ("checkpoint", "dino", "clip_b32", "clip_l14", "masks")
    }
    return Settings(
        **absolute,
        seed=args.seed,
        steps=args.steps,
        images_per_prompt=args.images_per_prompt,
        text_scale=args.text_scale,
        image_scale=args.image_scale,
        subject_fraction=args.subject_fraction,
        open_clip_act=args.open_clip_act,
    )


def _dreambench(args: argparse.Namespace) -> int:
    from sdjax.eval.dreambench import run_benchmark
    from sdjax.eval.report import write_report, write_tables

    settings = dreambench_settings(args)
    ran, total = run_benchmark(
        args.data, args.out, settings, args.subjects, args.prompts_per_subject, args.pairs
    )
    print(f"dreambench: {ran} prompts generated, {total - ran} already done")
    for path in write_tables(args.out):
        print(f"wrote {path}")
    if args.report:
        print(f"wrote {write_report(args.out)}")
    return 0
