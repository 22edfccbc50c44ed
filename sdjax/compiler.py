"""XLA compile options, passed only where this XLA knows them: an option one XLA has is
"No such compile option" to another (newer JAX dropped `xla_cpu_use_fusion_emitters`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def known_options(options: dict, device) -> dict:
    """The entries of `options` that `device`'s compiler accepts, each probed once by
    compiling a one-add program for it (a deviceless TPU topology's device works too;
    so does a call inside another mesh)."""
    return {k: v for k, v in options.items() if _accepts(device, k, v)}


@functools.cache
def _accepts(device, name: str, value) -> bool:
    mesh = Mesh(np.asarray([device]), ("probe",))
    with jax.set_mesh(mesh):  # not the caller's: the probe runs on `device` alone
        one = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
        try:
            jax.jit(lambda x: x + 1, compiler_options={name: value}).trace(one).lower().compile()
        except Exception as err:
            if "no such compile option" in str(err).lower():
                return False
            raise
    return True
