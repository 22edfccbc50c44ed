"""The `sdjax` command line: one subcommand per job.

Contract: bad input exits with status 2 and one line `error: ...` on stderr, and leaves no
partial file; input a run goes on with but will not read as written (a word the model does
not know) is one line `warning: ...`. A command's front end (its parser and `run`) is the
`cli.py` of the package whose work it drives: this file for the top-level commands (demo,
sample, plan, export, app), `sdjax.data.cli`, `sdjax.train.cli`, `sdjax.eval.cli`. None
imports JAX at module level, so `sdjax --help` and every command's `--help` answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from sdjax import __version__
from sdjax.data.cli import add_parser as add_data_parser
from sdjax.errors import InputWarning, UserError
from sdjax.eval.cli import add_parser as add_eval_parser
from sdjax.subjects import SPEC_FORMAT
from sdjax.train.cli import add_parser as add_train_parser

# Commands that sample: on CPU they split each batch over one device per core.
SAMPLING_COMMANDS = ("sample", "demo", "eval", "app")
EMBEDDED_MODEL = os.path.join(os.path.dirname(__file__), "assets", "default_model", "model.json")


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error contract: one line on stderr, exit status 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdjax", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"sdjax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_demo(sub)
    add_data_parser(sub)
    _add_sample(sub)
    add_train_parser(sub)
    _add_plan(sub)
    _add_export(sub)
    add_eval_parser(sub)
    _add_app(sub)
    return parser


def _print_input_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # Compiles are slow on CPU; a persistent cache makes the second run of a command cheap.
    os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "sdjax", "jax")
    )
    args = build_parser().parse_args(argv)
    if args.command in SAMPLING_COMMANDS:
        from sdjax.parallel.cpu import use_cpu_cores

        use_cpu_cores()
    with warnings.catch_warnings():
        warnings.simplefilter("always", InputWarning)
        shown = warnings.showwarning

        def show(message, category, *rest, **kw):
            if issubclass(category, InputWarning):
                return _print_input_warnings(message, category, *rest, **kw)
            return shown(message, category, *rest, **kw)

        warnings.showwarning = show
        try:
            return args.run(args) or 0
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2


# ---- sdjax demo -------------------------------------------------------------------------


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="personalise held-out toy subjects with the embedded model")
    p.add_argument("--out", default="out/demo", metavar="DIR", help="output folder")
    p.add_argument("--checkpoint", metavar="DIR", help="another model (default: the embedded)")
    p.add_argument("--cases", type=int, default=8, help="scenes to draw (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    p.set_defaults(run=_demo)


def _demo(args) -> int:
    from sdjax.demo import run_demo

    run_demo(args.out, args.checkpoint, args.cases, args.seed, args.steps)
    return 0


# ---- sdjax sample -----------------------------------------------------------------------


def _embedded_resolution() -> str:
    """The embedded model's output size, as its model.json says (no JAX needed)."""
    try:
        with open(EMBEDDED_MODEL) as f:
            size = json.load(f)["config"]["resolution"]
    except (OSError, ValueError, KeyError):
        return "the embedded model is missing"
    return f"the embedded model draws {size}x{size} px images"


class _NewSubject(argparse.Action):
    """--subject IMAGE starts a subject; the per-subject options after it are its own."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.subject_flags = [*(namespace.subject_flags or []), {"image": value}]


class _SubjectOption(argparse.Action):
    """--label / --mask / --box: an option of the --subject it follows."""

    def __call__(self, parser, namespace, value, option_string=None):
        subjects = namespace.subject_flags or []
        if not subjects:
            parser.error(
                f"{option_string} {value!r} comes before any --subject "
                "(a subject's options follow its --subject)"
            )
        if self.dest in subjects[-1]:
            parser.error(
                f"subject {len(subjects)} ({subjects[-1]['image']}) has {option_string} twice; "
                f"give each --subject its own {option_string} right after it"
            )
        subjects[-1][self.dest] = value


def _add_sample(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="generate images of given subjects in a prompted scene",
        description=(
            "Draw the subjects of reference images into the scene the prompt describes.\n"
            "A subject is --subject IMAGE --label WORD [--mask PATH] [--box X1,Y1,X2,Y2]:\n"
            "the options after a --subject are that subject's. Repeat for more subjects, or\n"
            "list them in --subjects SPEC.json (below). Output: one PNG at the model's\n"
            f"resolution ({_embedded_resolution()}); several images side by side."
        ),
        epilog=SPEC_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prompt", required=True, help="the scene, e.g. 'a star on a beige background'")
    p.add_argument(
        "--subject",
        action=_NewSubject,
        metavar="IMAGE",
        help="reference photo of a subject (repeat for several subjects); with transparency "
        "(an RGBA cut-out), its alpha is the mask",
    )
    p.add_argument(
        "--label",
        action=_SubjectOption,
        metavar="WORD",
        help="class word of the subject (e.g. star)",
    )
    p.add_argument(
        "--mask",
        action=_SubjectOption,
        metavar="PATH",
        help="the subject's mask (white = subject); default: the image's alpha, else all of it",
    )
    p.add_argument(
        "--box",
        action=_SubjectOption,
        metavar="X1,Y1,X2,Y2",
        help="where the subject goes, fractions of the image; default: placed automatically",
    )
    p.add_argument("--subjects", metavar="SPEC.json", help="subjects as a JSON list (below)")
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="pipeline folder or training workdir (default: the embedded model)",
    )
    p.add_argument("--out", required=True, metavar="PATH.png", help="output PNG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--text-scale", type=float, help="text guidance (default: the model's)")
    p.add_argument("--image-scale", type=float, help="image guidance (default: the model's)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument(
        "--subject-fraction",
        type=float,
        default=1.0,
        help="fraction of the steps conditioned on the subjects (docs/method.md §6)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="words the model does not know, or a prompt cut to fit, are errors (default: "
        "warnings)",
    )
    p.set_defaults(run=_sample, subject_flags=None)


def _check_png_output(path: str) -> None:
    """Refuse, before any work, an output the PNG could not be written to."""
    from sdjax import paths

    if not path.lower().endswith(".png"):
        raise UserError(f"--out must be a .png file, got {path}")
    if paths.is_remote(path):
        return
    if os.path.isdir(path):
        raise UserError(f"--out {path} is a folder; give a file name ending in .png")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder is not writable: {folder}")


def _subjects(args) -> list:
    """The subjects of the flags, then those of --subjects, every image and mask read."""
    from sdjax.subjects import Subject, load_subject, parse_box, read_subject_spec

    subjects = []
    for i, flags in enumerate(args.subject_flags or []):
        if "label" not in flags:
            raise UserError(f"subject {i + 1} ({flags['image']}) has no --label after it")
        box = flags.get("box")
        box = None if box is None else parse_box(box, f"subject {i + 1} --box")
        subjects.append(Subject(flags["image"], flags["label"], flags.get("mask"), box))
    if args.subjects:
        subjects.extend(read_subject_spec(args.subjects))
    for i, subject in enumerate(subjects):
        load_subject(subject, i)  # every file readable and consistent, before the model loads
    return subjects


def _sample(args) -> int:
    _check_png_output(args.out)
    subjects = _subjects(args)
    from sdjax.sampling import check_settings

    check_settings(
        args.steps, args.text_scale, args.image_scale, args.num_images, args.subject_fraction
    )
    from sdjax.outputs import sample_png
    from sdjax.pipeline import load_pipeline
    from sdjax.sampling import guidance_scales

    pipeline = load_pipeline(args.checkpoint)
    text_scale, image_scale = guidance_scales(pipeline.config, args.text_scale, args.image_scale)
    images = sample_png(
        pipeline,
        args.prompt,
        subjects,
        args.out,
        args.checkpoint or "embedded default",
        seed=args.seed,
        num_steps=args.steps,
        text_scale=text_scale,
        image_scale=image_scale,
        subject_fraction=args.subject_fraction,
        num_images=args.num_images,
        strict=args.strict,
    )
    print(f"wrote {args.out} ({len(images)} image{'s' * (len(images) > 1)}, seed {args.seed})")
    return 0


# ---- sdjax plan -------------------------------------------------------------------------


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="compile the train step (or sampler) for a TPU topology or N devices: memory, speed",
    )
    p.add_argument("--config", required=True, help="Python config file (configs/*.py)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument("--topology", help="a TPU topology, e.g. v5p:2x2x4 (needs sdjax[tpu])")
    target.add_argument("--cpu-devices", type=int, help="N CPU devices (default: local devices)")
    p.add_argument("--devices", type=int, help="use only the first N devices of the target")
    p.add_argument("--sampler", action="store_true", help="plan the sampler, not the train step")
    p.add_argument("--batch", type=int, default=8, help="with --sampler: images (default 8)")
    p.add_argument("--steps", type=int, default=50, help="with --sampler: DDIM steps (default 50)")
    p.add_argument("--json", metavar="OUT.json", help="also write the report as JSON")
    p.set_defaults(run=_plan)


def _plan(args) -> int:
    from sdjax.config import load_config
    from sdjax.plan import memory_line, plan_sampler, plan_training, summary, target_devices

    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UserError(f"output folder does not exist: {os.path.dirname(args.json)}")
    if args.sampler and (args.batch < 1 or args.steps < 1):
        raise UserError(f"--batch and --steps must be at least 1, got {args.batch}, {args.steps}")
    config = load_config(args.config, args.set)
    devices = list(target_devices(args.topology, args.cpu_devices))
    if args.devices is not None:
        if not 1 <= args.devices <= len(devices):
            raise UserError(f"--devices must be in 1..{len(devices)}, got {args.devices}")
        devices = devices[: args.devices]
    if args.sampler:
        report = plan_sampler(config, devices, args.batch, args.steps)
    else:
        report = plan_training(config, devices)
    report = {"config": args.config, "overrides": args.set, "sampler": args.sampler, **report}
    if args.topology:
        report["topology"] = args.topology
    print(summary(report))
    if args.json:
        from sdjax.convert.files import write_json

        write_json(args.json, report)
    if not report["fits"]:
        raise UserError(f"does not fit: {report.get('compile_error') or memory_line(report)}")
    return 0


# ---- sdjax export -----------------------------------------------------------------------


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a trained model in diffusers/transformers formats",
        description="diffusers (default): PyTorch formats (see `sdjax.export`); sdjax: a "
        "native pipeline folder that `sdjax.load_pipeline(OUT_DIR)` reads. CHECKPOINT and "
        "OUT_DIR may be gs:// URLs. OUT_DIR must be new or empty; it appears only complete.",
    )
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
    p.set_defaults(run=_export)


def _export(args) -> int:
    from sdjax.export import export

    export(args.checkpoint, args.out, args.format, use_ema=False if args.raw_weights else None)
    print(f"exported {args.checkpoint} to {args.out}")
    return 0


# ---- sdjax app --------------------------------------------------------------------------


def _add_app(sub) -> None:
    p = sub.add_parser(
        "app",
        help="personalise in the browser: a local web page where boxes are drawn (needs [app])",
        description=(
            "A local web page on a model: upload each subject's photo, brush or upload its\n"
            "mask, type its label, draw its box on the output frame, generate. The same\n"
            "function is an API for gradio_client (api_name 'generate'). Only this machine\n"
            "can reach it unless --host says otherwise. Needs pip install 'sdjax[app]'."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="pipeline folder or training workdir (default: the embedded model)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: local only)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument(
        "--max-upload-mb", type=float, default=10.0, help="largest upload accepted (default 10)"
    )
    p.set_defaults(run=_app)


def _app(args) -> int:
    import importlib.util
    import tempfile

    if importlib.util.find_spec("gradio") is None:
        raise UserError("sdjax app needs Gradio: pip install 'sdjax[app]'")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if not args.max_upload_mb > 0:
        raise UserError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    from sdjax.app import load_model, serve

    model = load_model(args.checkpoint)
    print(f"compiling the sampler for {model.name} ...", flush=True)
    seconds = model.warm_up()
    print(f"compiled in {seconds:.0f} s", flush=True)
    out_dir = tempfile.mkdtemp(prefix="sdjax-app-")
    serve(model, args.host, args.port, args.max_upload_mb, out_dir)
    return 0
