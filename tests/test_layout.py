"""The package reads the way it works: no import circles, one command-line style, one
spelling, `--help` without JAX, and references that point into the repository."""

import argparse
import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "sdjax")


def modules() -> dict[str, str]:
    """Module name -> path, for every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Every import of one sdjax module by another, wherever it is written (in a function,
    under TYPE_CHECKING): a circle is a circle of concepts even when it runs."""
    mods = modules()
    graph = {}
    for module, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[module] = {d for d in deps if d in mods and d != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    graph = import_graph()
    assert "sdjax.pipeline" in graph["sdjax.cli"] or graph  # the scan sees the package
    assert circles(graph) == []


def test_the_scan_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_model_module_cannot_be_confused_with_the_models_package():
    assert not os.path.exists(os.path.join(PACKAGE, "model.py"))
    assert os.path.isfile(os.path.join(PACKAGE, "subject_diffusion.py"))


def test_one_command_line_style():
    """A command's front end is the `cli.py` of the package whose work it drives."""
    assert not [n for n in os.listdir(PACKAGE) if n.endswith("_cli.py")]
    parsers = set()
    for path in modules().values():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "add_parser":
                parsers.add(os.path.relpath(path, ROOT))
    assert parsers and all(os.path.basename(p) == "cli.py" for p in parsers), sorted(parsers)


HELP_WITHOUT_JAX = """
import argparse, sys
from sdjax.cli import build_parser, main

def commands(parser, prefix=()):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*prefix, name))

shown = []
for command in commands(build_parser()):
    try:
        main([*command, "--help"])
    except SystemExit as exit:
        assert exit.code == 0, command
    shown.append(" ".join(command))
HEAVY = ("jax", "flax", "orbax", "optax", "torch", "grain", "gradio")
heavy = [m for m in HEAVY if m in sys.modules]
print(len(shown), heavy, file=sys.stderr)
"""


def test_every_help_runs_without_importing_jax():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_JAX], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    count, heavy = done.stderr.strip().splitlines()[-1].split(" ", 1)
    assert int(count) >= 15  # sdjax, demo, data (5 + 3 imports), sample, train, plan, ...
    assert heavy == "[]", f"--help imported {heavy}"
    assert "usage: sdjax" in done.stdout and "usage: sdjax eval dreambench" in done.stdout


# Our words in British spelling; names taken from other libraries keep theirs.
AMERICAN = re.compile(  # a name after "." is another library's (torch's F.normalize)
    r"(?<![.\w])\w*(?:normaliz|summariz|personaliz|serializ|materializ|visualiz|randomiz|organiz|"
    r"recogniz|minimiz|maximiz|vectoriz|quantiz|customiz|regulariz|initializ|optimiz)\w*",
    re.I,
)
FOREIGN = {
    "normalized",  # tokenizers.AddedToken(normalized=...)
    "normalizer",  # tokenizers.normalizers
    "normalizers",
    "Normalize",  # torchvision.transforms.Normalize (the transform we reproduce)
    "safe_serialization",  # diffusers / transformers argument
    "initialize",  # jax.distributed.initialize, which sdjax.parallel.distributed mirrors
    "is_initialized",
    "initialization_timeout",
    "initializers",  # flax.linen.initializers
    "optimizer",  # optax's word
    "xla_backend_optimization_level",
    "Personalized",  # the paper's title
}


def spelling_files():
    for top in ("sdjax", "tests", "bench", "configs", "docs"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith((".py", ".md")):
                    path = os.path.join(folder, name)
                    relative = os.path.relpath(path, ROOT)
                    if relative != "tests/test_layout.py":
                        yield relative, path
    yield "README.md", os.path.join(ROOT, "README.md")


def test_one_spelling():
    found = []
    for relative, path in spelling_files():
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                words = set(AMERICAN.findall(line)) - FOREIGN
                found += [f"{relative}:{number}: {w}" for w in sorted(words)]
    assert not found, "\n".join(found)


SPEC_REFERENCE = re.compile(r"\bSPEC \d|shared/NOTES|shared/SPEC|NOTES\.md")
DOCS_REFERENCE = re.compile(r"docs/(\w+\.md) §(\d+[a-z]?)")


def reference_files():
    for top in ("sdjax", "configs", "bench", "tests", "docs", "launch"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith((".py", ".md", ".sh", ".sbatch")):
                    path = os.path.join(folder, name)
                    yield os.path.relpath(path, ROOT), path
    for name in ("README.md", "BENCHMARKS.md", "pyproject.toml", "Makefile"):
        yield name, os.path.join(ROOT, name)


def headings(doc: str) -> set[str]:
    """Section numbers of a docs/ file: '## 3. ...' -> '3', '### 3a. ...' -> '3a'."""
    with open(os.path.join(ROOT, "docs", doc)) as f:
        return set(re.findall(r"^#{2,3} (\d+[a-z]?)\.", f.read(), re.M))


def test_references_point_into_the_repository():
    stale, broken = [], []
    for relative, path in reference_files():
        if relative.startswith("sdjax/assets/") or relative == "tests/test_layout.py":
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if SPEC_REFERENCE.search(text):
            stale.append(relative)
        for doc, section in DOCS_REFERENCE.findall(text):
            if not os.path.isfile(os.path.join(ROOT, "docs", doc)) or section not in headings(doc):
                broken.append(f"{relative}: docs/{doc} §{section}")
    assert not stale, f"references to files outside the repository in {stale}"
    assert not broken, broken


@pytest.mark.parametrize("doc", ["method.md", "design.md"])
def test_docs_exist(doc):
    assert len(headings(doc)) >= 5


def test_parser_walk_sees_nested_commands():
    from sdjax.cli import build_parser

    subparsers = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"sample", "train", "eval", "data", "export", "demo", "plan"} <= set(
        subparsers[0].choices
    )
