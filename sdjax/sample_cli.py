"""`sdjax sample`: personalised images from the command line, written as one PNG.

Subjects come from repeated flags (`--subject IMG --label WORD [--mask M] [--box B]`,
masks and boxes paired with subjects in order) and/or a JSON list (`--subjects FILE`,
entries `{"image", "label", "mask"?, "box"?}`, paths relative to the file). Several
images are written as one grid; the settings go into the PNG's text metadata. The file
appears only when generation succeeded (written to a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os

from sdjax.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate images of given subjects in a prompted scene")
    p.add_argument("--prompt", required=True, help="the scene, e.g. 'a dog on the beach'")
    p.add_argument(
        "--subject",
        action="append",
        default=[],
        metavar="IMAGE",
        help="reference photo of a subject (repeat for several subjects)",
    )
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="WORD",
        help="class word of each --subject, in order (e.g. dog)",
    )
    p.add_argument(
        "--mask",
        action="append",
        default=[],
        metavar="PATH",
        help="mask of the i-th subject (white = subject); default: whole image",
    )
    p.add_argument(
        "--box",
        action="append",
        default=[],
        metavar="X1,Y1,X2,Y2",
        help="where the i-th subject goes, fractions of the image; default: automatic",
    )
    p.add_argument("--subjects", metavar="SPEC.json", help="subjects as a JSON list")
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="pipeline folder or training workdir (default: the embedded model)",
    )
    p.add_argument("--out", required=True, metavar="PATH.png", help="output PNG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--text-scale", type=float, help="text guidance (default: the model's)")
    p.add_argument("--image-scale", type=float, help="image guidance (default: the model's)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument(
        "--subject-fraction",
        type=float,
        default=1.0,
        help="fraction of the steps conditioned on the subjects (paper eq. 4)",
    )
    p.set_defaults(run=run)


def parse_box(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"box {text!r} is not four comma-separated numbers") from None


def subjects_from_args(args: argparse.Namespace) -> list:
    from sdjax.sampling import Subject

    if len(args.label) != len(args.subject):
        raise UserError(f"{len(args.subject)} --subject but {len(args.label)} --label")
    for flag in ("mask", "box"):
        if len(getattr(args, flag)) > len(args.subject):
            raise UserError(
                f"more --{flag} ({len(getattr(args, flag))}) than --subject ({len(args.subject)})"
            )
    subjects = [
        Subject(
            image,
            label,
            args.mask[i] if i < len(args.mask) else None,
            parse_box(args.box[i]) if i < len(args.box) else None,
        )
        for i, (image, label) in enumerate(zip(args.subject, args.label))
    ]
    if args.subjects:
        subjects.extend(read_subject_spec(args.subjects))
    return subjects


def read_subject_spec(path: str) -> list:
    from sdjax.sampling import Subject

    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read subjects file {path}: {err}") from None
    if not isinstance(entries, list):
        raise UserError(f"{path}: expected a JSON list of subjects")
    base = os.path.dirname(os.path.abspath(path))
    subjects = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise UserError(f"{path}: entry {i} needs 'image' and 'label'")
        mask = entry.get("mask")
        subjects.append(
            Subject(
                os.path.join(base, entry["image"]),
                str(entry["label"]),
                os.path.join(base, mask) if mask else None,
                entry.get("box"),
            )
        )
    return subjects


def run(args: argparse.Namespace) -> int:
    from sdjax.sampling import check_settings

    if not args.out.lower().endswith(".png"):
        raise UserError(f"--out must be a .png file, got {args.out}")
    subjects = subjects_from_args(args)
    check_settings(
        args.steps, args.text_scale, args.image_scale, args.num_images, args.subject_fraction
    )
    from sdjax.pipeline import load_pipeline
    from sdjax.sampling import guidance_scales, sample

    pipeline = load_pipeline(args.checkpoint)
    text_scale, image_scale = guidance_scales(pipeline.config, args.text_scale, args.image_scale)
    images = sample(
        pipeline,
        args.prompt,
        subjects,
        seed=args.seed,
        num_steps=args.steps,
        text_scale=text_scale,
        image_scale=image_scale,
        num_images=args.num_images,
        subject_fraction=args.subject_fraction,
    )
    settings = {
        "prompt": args.prompt,
        "subjects": json.dumps(
            [
                {"image": str(s.image), "label": s.label, "box": list(s.box) if s.box else None}
                for s in subjects
            ]
        ),
        "seed": str(args.seed),
        "steps": str(args.steps),
        "text_scale": str(text_scale),
        "image_scale": str(image_scale),
        "subject_fraction": str(args.subject_fraction),
        "checkpoint": args.checkpoint or "embedded default",
    }
    write_png(grid(images), args.out, settings)
    print(f"wrote {args.out} ({len(images)} image{'s' * (len(images) > 1)}, seed {args.seed})")
    return 0


def grid(images: list):
    """Images side by side in rows of up to 4 (one image is returned as is)."""
    from PIL import Image

    if len(images) == 1:
        return images[0]
    w, h = images[0].size
    cols = min(4, len(images))
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    return sheet


def write_png(image, path: str, text: dict[str, str]) -> None:
    """Save with PNG text chunks, atomically (no partial file on failure)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"output folder does not exist: {folder}")
    tmp = path + ".tmp"
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
