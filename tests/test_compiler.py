"""XLA options reach a compile only where that XLA knows them."""

import jax
import numpy as np

from sdjax.compiler import known_options


def test_unknown_options_are_dropped_known_ones_kept():
    cpu = jax.devices("cpu")[0]
    options = {"xla_cpu_enable_fast_math": False, "xla_no_such_option_anywhere": True}
    assert known_options(options, cpu) == {"xla_cpu_enable_fast_math": False}
    assert known_options({}, cpu) == {}
    # Inside a mesh of other devices (as the train step is planned) the probe still runs
    # on the device alone.
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    with jax.set_mesh(mesh):
        assert known_options({"xla_cpu_enable_fast_math": True}, cpu) == {
            "xla_cpu_enable_fast_math": True
        }
