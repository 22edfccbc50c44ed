"""Every config key the code reads is listed in the configs that run that code, so
`--set section.key=value` can change it (a key a config lacks is refused as unknown).

The code is read, not run: every `.get("key")` and attribute read on a config section
(`config.train.lr`, `train_cfg.get("b1")`, `self.config.get("init")`), and the fields of
the dataclasses a section becomes (`data` -> `sdjax.data.loader.data_keys()`, `loss` ->
`sdjax.train.step.LossConfig`). Reads in a task's own module count for that task's
configs only; all others for every config.
"""

import ast
import os

import pytest

from sdjax.config import load_config
from sdjax.data.loader import data_keys
from sdjax.train.step import LossConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "sdjax")
CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
SECTIONS = {"train", "data", "loss", "init"}
# Names that hold a section wherever they appear (function parameters).
SECTION_NAMES = {"train_cfg": "train", "loss_cfg": "loss"}
CONFIG_NAMES = {"config", "c"}  # a whole run config, as `config` or `self.config`
CONFIGDICT_METHODS = {"get", "to_dict", "update", "items", "keys", "values", "copy", "lock"}
TASK_MODULES = {
    "train/tasks/clip.py": {"clip"},
    "train/tasks/subject_diffusion.py": {"subject_diffusion"},
    "train/step.py": {"subject_diffusion"},
    "convert/pretrained.py": {"subject_diffusion"},
}
TASKS = {"clip", "subject_diffusion"}
# Modules whose `config` is not a run config.
NOT_RUN_CONFIG = {"torch_modules.py"}  # an exported model's sdjax.json


def _is_config(node) -> bool:
    """`config`, `c` or `self.config`."""
    if isinstance(node, ast.Name):
        return node.id in CONFIG_NAMES
    return isinstance(node, ast.Attribute) and node.attr == "config"


def _section(node, named: dict) -> str | None:
    """The config section an expression holds ("" for the whole config), else None."""
    if isinstance(node, ast.BoolOp):  # `(self.config.get("init") or {})`
        return _section(node.values[0], named)
    if isinstance(node, ast.Name):
        if node.id in named:
            return named[node.id]
        return "" if node.id in CONFIG_NAMES else SECTION_NAMES.get(node.id)
    if isinstance(node, ast.Attribute):
        if node.attr in SECTIONS and _is_config(node.value):
            return node.attr
        return "" if node.attr == "config" else None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        inner = _section(node.func.value, named)
        key = node.args[0] if node.args else None
        if node.func.attr == "get" and inner == "" and isinstance(key, ast.Constant):
            return key.value if key.value in SECTIONS else None
    return None


def reads(tree) -> set[tuple[str, str]]:
    """(section, key) pairs a module reads ("" section: the top level)."""
    named = {}
    for node in ast.walk(tree):  # `train = config.train`, `init = config.get("init")`
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and _section(node.value, {}) in SECTIONS:
                named[target.id] = _section(node.value, {})
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            section = _section(node.func.value, named)
            key = node.args[0] if node.args else None
            if node.func.attr == "get" and section is not None and isinstance(key, ast.Constant):
                found.add((section, key.value))
        elif isinstance(node, ast.Attribute) and node.attr not in CONFIGDICT_METHODS:
            section = _section(node.value, named)
            if section:  # attribute reads of a section (the whole config has sections)
                found.add((section, node.attr))
    return found


def code_reads() -> dict[str, set[tuple[str, str]]]:
    """task -> the (section, key) pairs its runs read."""
    by_task = {task: set() for task in TASKS}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, PACKAGE)
            if relative in NOT_RUN_CONFIG:
                continue
            with open(path) as f:
                found = reads(ast.parse(f.read()))
            for task in TASK_MODULES.get(relative, TASKS):
                by_task[task] |= found
    for task in TASKS:
        by_task[task] |= {("data", key) for key in data_keys()}
    by_task["subject_diffusion"] |= {("loss", key) for key in LossConfig._fields}
    return by_task


def test_the_scan_sees_the_reads_it_must():
    found = code_reads()
    for pair in [("train", "b1"), ("train", "weight_decay"), ("train", "lr"), ("", "task")]:
        assert pair in found["subject_diffusion"], pair
    assert ("loss", "ema_decay") in found["subject_diffusion"]
    assert ("data", "hflip_prob") in found["clip"] and ("init", "pretrained") not in found["clip"]
    tree = ast.parse("def f(config):\n    init = config.get('init')\n    return init.get('x')")
    assert reads(tree) == {("", "init"), ("init", "x")}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_key_the_code_reads_is_in_the_config(name):
    config = load_config(os.path.join(ROOT, "configs", name))
    task = config.get("task", "subject_diffusion")
    missing = sorted(
        f"{section}.{key}" if section else key
        for section, key in code_reads()[task]
        if key not in (config.get(section, {}) if section else config)
    )
    assert not missing, f"configs/{name} lacks keys the code reads: {', '.join(missing)}"
