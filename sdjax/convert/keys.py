"""Strict maps between Flax parameter trees and PyTorch state dicts.

Our modules are named after their PyTorch counterparts, so one rule gives every key:
the Flax path ('down_blocks_0', 'resnets_1', 'conv1', 'kernel') is the PyTorch key
'down_blocks.0.resnets.1.conv1.weight'. A component 'name_N' whose name is one of the
model's module lists (its `KeyTable.lists`) becomes 'name.N'; leaves are renamed
(kernel / scale / embedding -> weight) and re-laid out (Dense `[in, out]` <-> `[out, in]`,
Conv HWIO <-> OIHW). Anything missing, unexpected, wrongly shaped or not a float is an
error naming the key, never a warning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flax import traverse_util

from sdjax.convert.files import CheckpointError
from sdjax.models.layers import unbox

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_FLOAT_KINDS = "f"  # numpy kind of float16/32/64; bfloat16 is checked by name


@dataclass(frozen=True)
class KeyTable:
    """How one model's Flax paths spell PyTorch keys.

    lists: names of module lists ('down_blocks', 'resnets', 'to_out', ...).
    prefix: prepended to every PyTorch key (e.g. 'text_model.').
    renames: Flax component -> PyTorch component, for names that differ.
    """

    lists: frozenset[str]
    prefix: str = ""
    renames: Mapping[str, str] = field(default_factory=dict)

    def torch_key(self, path: tuple[str, ...]) -> str:
        parts = []
        for i, name in enumerate(path):
            if i == len(path) - 1:
                parts.append(self.renames.get(name, _LEAF_TO_TORCH.get(name, name)))
                continue
            m = re.fullmatch(r"(.+)_(\d+)", name)
            if m and m.group(1) in self.lists:
                parts.extend([m.group(1), m.group(2)])
            else:
                parts.append(self.renames.get(name, name))
        return self.prefix + ".".join(parts)


def to_torch_layout(leaf: str, x: np.ndarray) -> np.ndarray:
    """A Flax leaf in PyTorch's layout."""
    if leaf == "kernel" and x.ndim == 4:
        return np.transpose(x, (3, 2, 0, 1))
    if leaf == "kernel" and x.ndim == 2:
        return x.T
    return x


def to_flax_layout(leaf: str, x: np.ndarray) -> np.ndarray:
    """A PyTorch tensor in the layout of the Flax leaf `leaf`."""
    if leaf == "kernel" and x.ndim == 4:
        return np.transpose(x, (2, 3, 1, 0))
    if leaf == "kernel" and x.ndim == 2:
        return x.T
    return x


def flax_to_torch(params, table: KeyTable) -> dict[str, np.ndarray]:
    """A Flax parameter tree as a PyTorch-layout state dict of float32 numpy arrays."""
    flat = traverse_util.flatten_dict(unbox(params))
    return {
        table.torch_key(path): np.asarray(
            to_torch_layout(path[-1], np.asarray(x, np.float32)), order="C"
        )
        for path, x in flat.items()
    }


def torch_to_flax(state: Mapping[str, np.ndarray], abstract, table: KeyTable, *, what: str):
    """Fill the shapes of `abstract` (a tree of ShapeDtypeStructs) from `state`, strictly.

    Returns a tree of float32 numpy arrays. `what` names the checkpoint in errors.
    """
    return _fill(state, abstract, table.torch_key, to_flax_layout, _torch_shape, what)


def flat_to_tree(state: Mapping[str, np.ndarray], abstract, *, what: str):
    """`tree_to_flat`'s inverse, as strict as `torch_to_flax` ('a/b/kernel' keys)."""
    return _fill(state, abstract, "/".join, lambda leaf, x: x, lambda leaf, s: s, what)


def tree_to_flat(params) -> dict[str, np.ndarray]:
    """A parameter tree as {'a/b/kernel': float32 array} in our own (Flax) layout."""
    flat = traverse_util.flatten_dict(unbox(params))
    return {"/".join(path): np.asarray(x, np.float32) for path, x in flat.items()}


def _fill(state, abstract, key_of, layout, file_shape, what: str):
    flat = traverse_util.flatten_dict(unbox(abstract))
    by_key = {key_of(path): path for path in flat}
    missing = sorted(set(by_key) - set(state))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{what}: missing key {missing[0]!r}{more}")
    unexpected = sorted(set(state) - set(by_key))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{what}: unexpected key {unexpected[0]!r}{more}")
    out = {}
    for key, path in by_key.items():
        tensor = state[key]
        if not _is_float(tensor.dtype):
            raise CheckpointError(f"{what}: key {key!r} has dtype {tensor.dtype}, expected a float")
        value = layout(path[-1], np.asarray(tensor, np.float32))
        want = tuple(flat[path].shape)
        if value.shape != want:
            raise CheckpointError(
                f"{what}: key {key!r} has shape {tuple(tensor.shape)}, "
                f"expected {file_shape(path[-1], want)}"
            )
        out[path] = value
    return traverse_util.unflatten_dict(out)


def _is_float(dtype) -> bool:
    return np.dtype(dtype).kind == _FLOAT_KINDS or np.dtype(dtype).name == "bfloat16"


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape
