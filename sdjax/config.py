"""Training configs: Python files whose `get_config()` returns an `ml_collections.ConfigDict`.

`load_config(path, overrides)` runs the file and applies `--set key=value` overrides
(dotted keys; a value that parses as a Python literal is one, else it is a string).
Every config has `train.num_steps`, `train.checkpoint_every`, `train.log_every`,
`train.seed` and `data.path`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os

import ml_collections

from sdjax.errors import UserError

REQUIRED = ("train.num_steps", "train.checkpoint_every", "train.log_every", "train.seed")


def parse_override(text: str) -> tuple[str, object]:
    """'train.num_steps=24' -> ('train.num_steps', 24); non-literals stay strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"--set expects key=value, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def apply_override(config: ml_collections.ConfigDict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node:
            raise UserError(f"--set {key}: no config section {'.'.join(parents[: i + 1])!r}")
        node = node[name]
    if leaf not in node:
        raise UserError(f"--set {key}: unknown config key")
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    try:
        node[leaf] = value
    except TypeError as err:  # ConfigDict keeps a field's type
        raise UserError(f"--set {key}={value!r}: {err}") from None


def load_config(path: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    if not path.endswith(".py"):
        raise UserError(f"config {path} is not a Python file (configs/*.py: get_config())")
    spec = importlib.util.spec_from_file_location(f"sdjax_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise UserError(f"config {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # a broken config file is the user's to fix: name it
        raise UserError(f"config {path} failed to load: {type(err).__name__}: {err}") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"config {path} has no get_config()")
    config = module.get_config()
    for text in overrides:
        apply_override(config, *parse_override(text))
    for key in REQUIRED:
        section, leaf = key.split(".")
        if section not in config or leaf not in config[section]:
            raise UserError(f"config {path} lacks {key}")
    if "data" not in config or "path" not in config.data:
        raise UserError(f"config {path} lacks data.path")
    return config


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
