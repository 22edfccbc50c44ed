"""Checkpoint files: safetensors (single or sharded with an index) and JSON configs.

Reading memory-maps the file (a multi-GB UNet is not copied) and understands every dtype
PyTorch writes, bfloat16 included; any damage (short file, bad header, tensor outside the
file, a NaN or infinity among the weights) is a `CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from sdjax.errors import UserError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(UserError):
    """A checkpoint that cannot be used as asked: missing, damaged or mismatched."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, memory-mapped, as numpy arrays."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header runs past the end of the file")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    tensors = {}
    mm = np.memmap(path, dtype=np.uint8, mode="r") if header else None
    for key, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key!r} has unknown dtype {info.get('dtype')}")
        begin, end = (data_start + o for o in info["data_offsets"])
        shape = tuple(info["shape"])
        if end > size or end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise CheckpointError(f"{path}: tensor {key!r} lies outside the file (truncated?)")
        tensors[key] = mm[begin:end].view(dtype).reshape(shape)
    check_finite(tensors, path)
    return tensors


def check_finite(tensors: Mapping[str, np.ndarray], where: str) -> None:
    """Refuse weights holding NaN or infinity: such a model samples black images or noise
    without any error, so damaged bytes must stop it at load."""
    for key, value in tensors.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.inexact) or value.dtype == ml_dtypes.bfloat16:
            finite = np.isfinite(value)
            if not finite.all():
                bad = value.size - int(np.count_nonzero(finite))
                raise CheckpointError(
                    f"{where}: tensor {key!r} has {bad} non-finite values (NaN or infinity) "
                    f"of {value.size}; the weights are damaged"
                )


def read_weights(folder: str, name: str) -> dict[str, np.ndarray]:
    """The weights `name` (e.g. 'model.safetensors') of a folder, single or sharded."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"not a checkpoint folder: {folder}")
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return read_safetensors(path)
    index = path + ".index.json"
    if os.path.isfile(index):
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
            tensors.update(read_safetensors(os.path.join(folder, shard)))
        return tensors
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    hint = f" (found: {', '.join(found)})" if found else ""
    raise CheckpointError(f"no {name} in {folder}{hint}")


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
    """Write tensors (contiguous numpy) as one .safetensors file, atomically."""
    tmp = path + ".tmp"
    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}
    save_file(arrays, tmp, metadata={"format": "pt", **(metadata or {})})
    os.chmod(tmp, 0o666 & ~file_mode_mask())  # safetensors writes 0600: others could not read
    os.replace(tmp, path)


def file_mode_mask() -> int:
    """The process's umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
