"""The device mesh: axes `data`, `fsdp`, `tensor`, shaped by the config (one may be -1).

Batches split over `data x fsdp`; parameters are sharded by logical-axis rules
(`sdjax.parallel.sharding`). One device, 8 fake CPU devices and many hosts all use the
same code; on several hosts `jax.devices()` lists every host's devices. On TPU the
devices are laid out by their physical topology (`mesh_utils.create_device_mesh`, so
neighbours on an axis are neighbours on the interconnect); over several slices the
`data` axis spans the slices (data-center network) and the rest stays within a slice.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from sdjax.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, tensor); a -1 entry takes the devices the others leave."""
    shape = [int(sizes.get(axis, 1)) for axis in AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise UserError("mesh: at most one axis may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if free:
        if num_devices % known:
            raise UserError(
                f"mesh: {num_devices} devices do not split into {dict(zip(AXES, shape))}"
            )
        shape[free[0]] = num_devices // known
    if int(np.prod(shape)) > num_devices:
        raise UserError(
            f"mesh {dict(zip(AXES, shape))} needs {int(np.prod(shape))} devices, have {num_devices}"
        )
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
    """A mesh over the first prod(shape) devices (all of them when an axis is -1)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    return Mesh(device_grid(shape, devices[: int(np.prod(shape))]), AXES)


def device_grid(shape: tuple[int, ...], devices: list) -> np.ndarray:
    """`devices` arranged as `shape` (data, fsdp, tensor): by physical topology on TPU,
    with `data` across slices when there are several; in list order elsewhere."""
    if devices[0].platform != "tpu":
        return np.asarray(devices).reshape(shape)
    from jax.experimental import mesh_utils

    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        if shape[0] % slices:
            raise UserError(f"mesh: the data axis ({shape[0]}) must split over {slices} slices")
        ici = (shape[0] // slices, *shape[1:])
        return mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):  # a part of a slice
        return np.asarray(devices).reshape(shape)


def batch_size_per_process(global_batch: int, mesh: Mesh) -> int:
    """Each process feeds its share of the global batch (which must split evenly)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards:
        raise UserError(f"global batch {global_batch} does not split over {shards} batch shards")
    if global_batch % jax.process_count():
        raise UserError(
            f"global batch {global_batch} does not split over {jax.process_count()} processes"
        )
    return global_batch // jax.process_count()
