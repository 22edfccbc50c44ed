"""Attention kernels: Pallas splash attention (interpreted on CPU) equals XLA's attention,
forward and gradients, with and without a factored mask; "auto" picks by platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models.kernels import attend, resolve

B, H, D = 2, 2, 16


def qkv(t, s, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((B, n, H, D)), jnp.float32) for n in (t, s, s))


def factors(t, s, seed=1):
    rng = np.random.default_rng(seed)
    blocked = jnp.asarray(rng.integers(0, 2, (B, t, 2)), jnp.float32)
    groups = jnp.asarray(rng.integers(0, 2, (B, s, 2)), jnp.float32).at[:, :16].set(0.0)
    return blocked, groups  # the first 16 keys are seen by every query


def loss(implementation, mask):
    def f(q, k, v):
        out = attend(q, k, v, scale=D**-0.5, implementation=implementation, factors=mask)
        return jnp.sum(out**2), out

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize(
    "t, s, masked",
    [(128, 256, False), (128, 256, True), (130, 130, False), (66, 130, True)],
)
def test_splash_equals_xla_forward_and_gradients(t, s, masked):
    """Also on ragged lengths (the adapter's 4096 + N tokens), which the kernel gets
    padded to multiples of 128 with the padded keys masked."""
    q, k, v = qkv(t, s)
    mask = factors(t, s) if masked else None
    (_, ours), our_grads = loss("splash", mask)(q, k, v)
    (_, ref), ref_grads = loss("xla", mask)(q, k, v)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5)
    for a, b in zip(our_grads, ref_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)


def test_splash_runs_ragged_lengths_in_the_kernel_and_short_keys_in_xla():
    def kernels(t, s):
        q, k, v = qkv(t, s)
        fn = lambda q, k, v: attend(q, k, v, scale=0.25, implementation="splash")  # noqa: E731
        return str(jax.make_jaxpr(fn)(q, k, v)).count("pallas_call")

    assert kernels(128, 128) == kernels(130, 130) == kernels(64, 128) == 1
    assert kernels(128, 77) == 0  # text keys: XLA


def test_auto_picks_by_platform():
    assert resolve("auto", "tpu") == "splash" and resolve("auto", "gpu") == "cudnn"
    assert resolve("auto", "cpu") == "xla" and resolve(None, "cpu") == "xla"
    assert resolve("cudnn", "cpu") == "cudnn"  # an explicit choice stands
    with pytest.raises(ValueError, match="attention 'flash'"):
        resolve("flash")
