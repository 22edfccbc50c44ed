"""Helpers for parity tests against PyTorch references (tiny random weights)."""

from __future__ import annotations

import numpy as np


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the tolerance is relative to the output's scale."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def assert_parity(ours, ref, tol: float = 1e-4):
    err = relative_error(ours, ref)
    assert err <= tol, f"relative max error {err:.3g} > {tol:g}"


def randomise_(module, std: float = 0.2, seed: int = 0):
    """Give every parameter of a PyTorch module random values (zero-init ones included)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def nchw(x):
    """NHWC numpy -> NCHW torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
    """NCHW torch tensor -> NHWC numpy."""
    return t.detach().float().numpy().transpose(0, 2, 3, 1)


def random_params(abstract, seed: int = 0, std: float = 0.15):
    """Random float32 numpy values in the shapes of an abstract parameter tree.

    Compiling a model's real initialiser costs tens of seconds on a 2-core CPU (one XLA
    kernel per random op); tests that only need some weights use these instead.
    """
    import jax
    from flax.linen import meta

    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: (rng.standard_normal(x.shape) * std).astype(np.float32), meta.unbox(abstract)
    )
