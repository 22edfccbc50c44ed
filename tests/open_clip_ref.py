"""open_clip's `transformer` module (its `VisionTransformer`) as a PyTorch reference.

`import open_clip` runs `open_clip/__init__.py`, which imports the whole library, and
through `open_clip.utils` torchvision; in this project's venv torchvision is absent or
broken (a CPU torch next to a PyPI torchvision build), so that import fails. The
reference only needs `open_clip.transformer`, whose sole torchvision use is a name
(`FrozenBatchNorm2d`, for ResNet towers) imported by `open_clip.utils`. So this module:
  1. registers a bare package module `open_clip` (its `__path__` from `find_spec`), so
     submodules import without `__init__.py` running;
  2. only if torchvision cannot be imported, puts minimal stand-ins for `torchvision`,
     `torchvision.ops` and `torchvision.ops.misc` (with a placeholder
     `FrozenBatchNorm2d` class) into `sys.modules` while `open_clip.transformer` imports,
     and removes them and the bare package afterwards, so that other code in the same
     process (library availability checks, `import open_clip`) sees the real state.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

_STUBS = ("torchvision", "torchvision.ops", "torchvision.ops.misc")


def load_open_clip_transformer() -> types.ModuleType:
    """The `open_clip.transformer` module, imported without `open_clip/__init__.py`."""
    if "open_clip.transformer" in sys.modules:
        return sys.modules["open_clip.transformer"]
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise ImportError("open_clip is not installed (pip package open-clip-torch)")
    added = {"open_clip": _bare_package(spec)}
    if not _torchvision_imports():
        added.update(_torchvision_stubs())
    saved = {name: sys.modules.get(name) for name in added}
    sys.modules.update(added)
    try:
        return importlib.import_module("open_clip.transformer")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _torchvision_imports() -> bool:
    try:
        import torchvision.ops.misc  # noqa: F401
    except Exception:  # a broken install raises more than ImportError
        return False
    return True


def _bare_package(spec) -> types.ModuleType:
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    return package


def _torchvision_stubs() -> dict[str, types.ModuleType]:
    class FrozenBatchNorm2d:
        """Placeholder: only ResNet towers (not used here) build this class."""

    modules = {}
    for name in _STUBS:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        modules[name] = module
    modules["torchvision"].ops = modules["torchvision.ops"]
    modules["torchvision.ops"].misc = modules["torchvision.ops.misc"]
    modules["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
    return modules
