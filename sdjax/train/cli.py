"""`sdjax train --config FILE --workdir DIR [--set key=value]...`."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train (or resume training) a model from a config file")
    p.add_argument("--config", required=True, help="Python config file (configs/*.py)")
    p.add_argument("--workdir", required=True, help="run folder: checkpoints, metrics, previews")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.num_steps=24 (repeatable)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sdjax.config import load_config
    from sdjax.train.loop import train

    config = load_config(args.config, args.set)
    metrics = train(config, args.workdir)
    if metrics:
        print(f"done: step {config.train.num_steps}, loss {metrics['loss']:.4f}")
    return 0
