"""The `sdjax` command line: one subcommand per job; bad input exits 2 with `error: ...`."""

from __future__ import annotations

import argparse
import os
import sys

from sdjax import __version__
from sdjax.data.cli import register as register_data
from sdjax.demo import add_parser as add_demo_parser
from sdjax.errors import UserError
from sdjax.eval.dreambench import add_parser as add_dreambench_parser
from sdjax.eval.toy import add_parser as add_toy_eval_parser
from sdjax.export_cli import add_parser as add_export_parser
from sdjax.parallel.cpu import use_cpu_cores
from sdjax.plan import add_parser as add_plan_parser
from sdjax.sample_cli import add_parser as add_sample_parser
from sdjax.train.cli import add_parser as add_train_parser

# Commands that sample: on CPU they split each batch over one device per core.
SAMPLING_COMMANDS = ("sample", "demo", "eval")


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error contract: one line on stderr, exit status 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdjax", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sdjax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    add_demo_parser(sub)
    register_data(sub)
    add_sample_parser(sub)
    add_train_parser(sub)
    add_plan_parser(sub)
    add_export_parser(sub)
    evaluate = sub.add_parser("eval", help="measure a model (toy world, DreamBench)")
    benchmarks = evaluate.add_subparsers(dest="benchmark", required=True, parser_class=_Parser)
    add_toy_eval_parser(benchmarks)
    add_dreambench_parser(benchmarks)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Compiles are slow on CPU; a persistent cache makes the second run of a command cheap.
    os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "sdjax", "jax")
    )
    args = build_parser().parse_args(argv)
    if args.command in SAMPLING_COMMANDS:
        use_cpu_cores()
    try:
        return args.run(args) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
