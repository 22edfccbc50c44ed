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


@pytest.mark.parametrize("masked", [False, True])
def test_splash_equals_xla_forward_and_gradients(masked):
    q, k, v = qkv(128, 256)
    mask = factors(128, 256) if masked else None
    (_, ours), our_grads = loss("splash", mask)(q, k, v)
    (_, ref), ref_grads = loss("xla", mask)(q, k, v)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5)
    for a, b in zip(our_grads, ref_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)


def test_splash_uses_the_kernel_only_on_multiples_of_128():
    def kernels(t):
        q, k, v = qkv(t, t)
        fn = lambda q, k, v: attend(q, k, v, scale=0.25, implementation="splash")  # noqa: E731
        return str(jax.make_jaxpr(fn)(q, k, v)).count("pallas_call")

    assert kernels(128) == 1 and kernels(64) == 0  # 64 tokens: XLA
    q, k, v = qkv(64, 64)
    np.testing.assert_allclose(
        np.asarray(attend(q, k, v, scale=0.25, implementation="splash")),
        np.asarray(attend(q, k, v, scale=0.25, implementation="xla")),
    )


def test_auto_picks_by_platform():
    assert resolve("auto", "tpu") == "splash" and resolve("auto", "gpu") == "cudnn"
    assert resolve("auto", "cpu") == "xla" and resolve(None, "cpu") == "xla"
    assert resolve("cudnn", "cpu") == "cudnn"  # an explicit choice stands
    with pytest.raises(ValueError, match="attention 'flash'"):
        resolve("flash")
