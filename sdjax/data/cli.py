"""`sdjax data ...`: make record folders (toy world, imports, curation), look at them, check them.

`add_parser(subparsers)` adds the `data` command to the main parser; handlers import the heavy
modules when they run, so `sdjax --help` stays fast. Bad input raises `UserError`.
"""

from __future__ import annotations

import argparse
import os

from sdjax.errors import UserError

_MODEL_ROLES = ("captioner", "detector", "segmenter")


def add_parser(subparsers) -> None:
    """Adds `data toy|import|curate|sheet|info` to an argparse subparsers object."""
    data = subparsers.add_parser("data", help="make, inspect and look at record folders")
    sub = data.add_subparsers(dest="data_command", required=True, parser_class=type(data))

    toy = sub.add_parser("toy", help="generate toy-world scenes into a record folder")
    toy.add_argument("--n", type=int, required=True, help="number of scenes")
    toy.add_argument("--out", required=True, help="output folder (must be empty)")
    toy.add_argument("--seed", type=int, default=0, help="scene stream (default 0)")
    toy.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    toy.add_argument(
        "--split",
        choices=["train", "heldout"],
        default="train",
        help="attribute combinations to draw from (default train)",
    )
    toy.add_argument("--records-per-shard", type=int, default=1000, metavar="K")
    toy.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="generator processes (default: one per CPU, at most 8)",
    )
    toy.add_argument("--overwrite", action="store_true", help="replace a dataset in --out")
    toy.set_defaults(run=_toy)

    sheet = sub.add_parser("sheet", help="draw a grid of a record folder's samples")
    sheet.add_argument("dir", help="record folder")
    sheet.add_argument("--out", help="PNG to write (default DIR/contact_sheet.png)")
    sheet.add_argument("--n", type=int, default=64, help="number of samples")
    sheet.set_defaults(run=_sheet)

    info = sub.add_parser("info", help="summarise (and check) a record folder")
    info.add_argument("dir", help="record folder")
    info.add_argument("--verify", action="store_true", help="decode every record")
    info.set_defaults(run=_info)
    _register_import(sub, type(data))
    _register_curate(sub)


def _output_args(parser) -> None:
    parser.add_argument("--out", required=True, help="output record folder (must be empty)")
    parser.add_argument("--records-per-shard", type=int, default=1000, metavar="K")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset in --out")
    parser.add_argument(
        "--no-filter", action="store_true", help="keep every subject (skip the authors' filters)"
    )


def _register_import(sub, parser_class) -> None:
    imports = sub.add_parser("import", help="import existing data into a record folder")
    kinds = imports.add_subparsers(dest="source", required=True, parser_class=parser_class)
    tars = kinds.add_parser("webdataset", help="the authors' webdataset tars (jpg/txt/png/json)")
    tars.add_argument("tars", nargs="+", help="tar files")
    coco = kinds.add_parser("coco", help="COCO instance annotations (polygons or RLE)")
    coco.add_argument("--instances", required=True, help="instances_*.json")
    coco.add_argument("--images", required=True, help="folder of the images")
    coco.add_argument("--captions", help="captions_*.json (default: category names)")
    folder = kinds.add_parser("folder", help="images with sidecar JSON (caption, subjects)")
    folder.add_argument("dir", help="folder searched recursively for sidecar .json files")
    for parser in (tars, coco, folder):
        _output_args(parser)
    tars.set_defaults(run=_import_webdataset)
    coco.set_defaults(run=_import_coco)
    folder.set_defaults(run=_import_folder)


def _register_curate(sub) -> None:
    curate = sub.add_parser(
        "curate",
        help="caption, detect, segment and filter images (one process, or Apache Beam)",
        description="The authors' curation (docs/method.md §5) with BLIP-2, Grounding DINO "
        "and SAM folders (save_pretrained; local or gs://). Input: a folder of images, "
        "webdataset tars, or COCO (--instances); local or gs://. An interrupted run resumes "
        "when the same command is run again. --beam runs it as an Apache Beam pipeline: every "
        "option after --beam is Beam's (default: the DirectRunner on every local core; "
        "--runner=DataflowRunner ...).",
    )
    curate.add_argument(
        "sources", nargs="+", metavar="SOURCE", help="image folder, or webdataset tars (*.tar)"
    )
    curate.add_argument("--instances", metavar="JSON", help="COCO instances file (SOURCE: images)")
    for role, model in zip(_MODEL_ROLES, ("BLIP-2", "Grounding DINO", "SAM")):
        curate.add_argument(
            f"--{role}", required=True, metavar="PATH", help=f"{model} folder (save_pretrained)"
        )
    curate.add_argument(
        "--device", default="auto", help="torch device (default auto: a GPU when there is one)"
    )
    curate.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="models'"
    )
    curate.add_argument(
        "--chunk-size", type=int, default=256, help="images per block (a shard; resume unit)"
    )
    curate.add_argument("--batch-size", type=int, default=16, help="images per model call")
    curate.add_argument(
        "--min-short-side", type=int, default=600, help="skip smaller images (default 600)"
    )
    curate.add_argument("--out", required=True, help="output record folder (local or gs://)")
    curate.add_argument("--overwrite", action="store_true", help="replace a dataset in --out")
    curate.add_argument(
        "--no-filter", action="store_true", help="keep every subject (skip the authors' filters)"
    )
    curate.add_argument(
        "--beam",
        nargs=argparse.REMAINDER,
        metavar="BEAM_OPTION",
        help="run on Apache Beam; the rest of the line is Beam's pipeline options (last)",
    )
    curate.set_defaults(run=_curate)


def _filters(args: argparse.Namespace, default):
    _positive("records-per-shard", args.records_per_shard)
    return None if args.no_filter else default


def _report(report, out: str) -> int:
    print(report.summary())
    print(f"wrote {report.images_kept} records to {out}")
    return 0


def _import_webdataset(args: argparse.Namespace) -> int:
    from sdjax.data.filters import AUTHORS_FILTERS
    from sdjax.data.importers import import_webdataset

    filters = _filters(args, AUTHORS_FILTERS)
    report = import_webdataset(args.tars, args.out, filters, args.records_per_shard, args.overwrite)
    return _report(report, args.out)


def _import_coco(args: argparse.Namespace) -> int:
    from sdjax.data.importers import coco

    filters = _filters(args, coco.COCO_FILTERS)
    report = coco.import_coco(
        args.instances,
        args.images,
        args.out,
        args.captions,
        filters,
        args.records_per_shard,
        args.overwrite,
    )
    return _report(report, args.out)


def _import_folder(args: argparse.Namespace) -> int:
    from sdjax.data.filters import AUTHORS_FILTERS
    from sdjax.data.importers import import_folder

    filters = _filters(args, AUTHORS_FILTERS)
    report = import_folder(args.dir, args.out, filters, args.records_per_shard, args.overwrite)
    return _report(report, args.out)


def _curate(args: argparse.Namespace) -> int:
    import functools

    from sdjax.data.curation import sources, stages
    from sdjax.data.filters import AUTHORS_FILTERS

    for role in _MODEL_ROLES:  # before the slow torch import
        stages.check_model_folder(getattr(args, role), role)
    for name in ("chunk_size", "batch_size"):
        _positive(name.replace("_", "-"), getattr(args, name))
    config = stages.CurationConfig(
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        min_short_side=args.min_short_side,
        filters=None if args.no_filter else AUTHORS_FILTERS,
    )
    units, described = sources.input_units(args.sources, args.chunk_size, args.instances)
    try:
        from sdjax.data.curation import models
    except ImportError as err:
        raise UserError(f"curation needs PyTorch (the torch or beam extra): {err}") from None
    factories = {
        role: functools.partial(cls, getattr(args, role), device=args.device, dtype=args.dtype)
        for role, cls in zip(
            _MODEL_ROLES, (models.Blip2Captioner, models.GroundingDinoDetector, models.SamSegmenter)
        )
    }
    provenance = {"models": {role: _absolute(getattr(args, role)) for role in _MODEL_ROLES}}
    if args.beam is not None:
        try:
            from sdjax.data.curation import beam
        except ImportError as err:
            raise UserError(f"--beam needs Apache Beam (the beam extra): {err}") from None
        report = beam.curate_units(
            units, described, beam.ModelSteps(**factories), args.out, config, args.beam,
            provenance, args.overwrite,
        )  # fmt: skip
    else:
        from sdjax.data.curation import local

        built = stages.Stages(**{role: factory() for role, factory in factories.items()})
        report = local.curate_units(
            units, described, built, args.out, config, provenance, args.overwrite
        )
    return _report(report, args.out)


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise UserError(f"--{name} must be at least 1, got {value}")


def _toy(args: argparse.Namespace) -> int:
    from sdjax.data.generate import write_toy_dataset

    for name in ("n", "size", "workers", "records_per_shard"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.seed < 0:
        raise UserError(f"--seed must be non-negative, got {args.seed}")
    written = write_toy_dataset(
        args.out,
        args.n,
        seed=args.seed,
        size=args.size,
        split=args.split,
        workers=args.workers,
        records_per_shard=args.records_per_shard,
        overwrite=args.overwrite,
    )
    sheet = os.path.join(args.out, "contact_sheet.png")
    _write_sheet(args.out, sheet, 64)
    print(
        f"wrote {args.n} {args.split} scenes (seed {args.seed}, {args.size} px) to {args.out}: "
        f"{len(written['shards'])} shards, {_megabytes(written['shards']):.1f} MB in "
        f"{written['seconds']:.1f} s; contact sheet {sheet}"
    )
    return 0


def _megabytes(shards: list[dict]) -> float:
    return sum(s["bytes"] for s in shards) / 1e6


def _write_sheet(root: str, out: str, n: int) -> int:
    from sdjax.data.contact_sheet import write_contact_sheet

    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise UserError(f"folder of {out} does not exist")
    if os.path.splitext(out)[1].lower() != ".png":
        raise UserError(f"contact sheet {out} must be a .png file")
    return write_contact_sheet(root, out, n)


def _sheet(args: argparse.Namespace) -> int:
    _positive("n", args.n)
    out = args.out or os.path.join(args.dir, "contact_sheet.png")
    shown = _write_sheet(args.dir, out, args.n)
    print(f"wrote a contact sheet of {shown} records from {args.dir} to {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import json

    from sdjax.data.shards import RecordSource

    source = RecordSource(args.dir)  # checks the manifest against the shards
    manifest = source.manifest
    print(
        f"{args.dir}: {manifest['count']} records, schema {manifest['schema_version']}, "
        f"{len(manifest['shards'])} shards, {_megabytes(manifest['shards']):.1f} MB"
    )
    print(f"provenance: {json.dumps(manifest['provenance'], sort_keys=True)}")
    if args.verify:
        intact = sum(source[i] is not None for i in range(len(source)))
        print(f"verified: {intact} intact, {source.corrupt_count} corrupt")
    return 0
