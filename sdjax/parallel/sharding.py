"""Sharding declared as data: logical axis rules from the config, applied to abstract trees.

Parameters carry logical axis names (`sdjax.models.layers`); `rules` map them onto mesh
axes, e.g. `(("embed", "fsdp"), ("mlp", "tensor"), ("batch", ("data", "fsdp")))`. A
logical name without a rule is replicated. Batches are split over `data x fsdp` along
their first axis.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdjax.models.layers import unbox
from sdjax.parallel.mesh import BATCH_AXES

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def as_rules(rules) -> tuple:
    """Config rules (lists from JSON/ConfigDict) as the tuples flax expects."""
    return tuple(
        (name, tuple(target) if isinstance(target, list | tuple) else target)
        for name, target in rules
    )


class ReplicationFallback(UserWarning):
    """A rule asked to split a dimension its mesh axes do not divide: it is replicated."""


def tree_shardings(abstract, mesh: Mesh, rules: Rules):
    """NamedShardings for a tree of boxed (logically partitioned) abstract values.

    A dimension that its mesh axes do not divide is replicated instead (tiny models), with
    one `ReplicationFallback` warning that counts them and names a few.
    """
    specs = nn.get_partition_spec(abstract)
    specs = nn.logical_to_mesh(specs, as_rules(rules))
    shapes = unbox(abstract)
    replicated_dims = []

    def fit(path, spec, shape):
        if not isinstance(spec, PartitionSpec):
            return NamedSharding(mesh, PartitionSpec())
        dims = []
        for axis, size in zip(tuple(spec) + (None,) * (len(shape.shape) - len(spec)), shape.shape):
            names = (axis,) if isinstance(axis, str) else tuple(axis or ())
            ways = int(np.prod([mesh.shape[n] for n in names])) if names else 1
            dims.append(axis if names and size % ways == 0 else None)
            if names and ways > 1 and size % ways:
                replicated_dims.append(f"{jax.tree_util.keystr(path)} ({size} over {ways})")
        return NamedSharding(mesh, PartitionSpec(*dims))

    out = jax.tree_util.tree_map_with_path(
        fit, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    if replicated_dims:
        shown = ", ".join(replicated_dims[:3])
        more = f" and {len(replicated_dims) - 3} more" if len(replicated_dims) > 3 else ""
        warnings.warn(
            f"{len(replicated_dims)} parameter dimensions replicated: their mesh axes do not "
            f"divide them: {shown}{more}",
            ReplicationFallback,
            stacklevel=2,
        )
    return out


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict, mesh: Mesh) -> dict:
    """This process's numpy batch -> global jax arrays sharded over `data x fsdp`."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }
