"""The `sdjax` command line: one subcommand per job; bad input exits 2 with `error: ...`."""

from __future__ import annotations

import argparse
import sys

from sdjax import __version__
from sdjax.data.cli import register as register_data
from sdjax.errors import UserError
from sdjax.export_cli import add_parser as add_export_parser
from sdjax.sample_cli import add_parser as add_sample_parser
from sdjax.train.cli import add_parser as add_train_parser


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error contract: one line on stderr, exit status 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _demo(args: argparse.Namespace) -> int:
    print(
        "sdjax demo: the embedded default model is not built yet; "
        "this stage only checks that the package and JAX load."
    )
    import jax

    print(f"sdjax {__version__}, jax {jax.__version__}, devices: {jax.devices()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdjax", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sdjax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="run the main job on the embedded default model")
    demo.add_argument("--out", default="out/demo", help="output folder")
    demo.set_defaults(run=_demo)
    register_data(sub)
    add_sample_parser(sub)
    add_train_parser(sub)
    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
