"""Multi-head attention and the GEGLU feed-forward, named as in diffusers.

Token tensors are `[B, T, D]`; heads are split inside (`D = heads * head_dim`). The core
is `sdjax.models.kernels.attend`: XLA, cuDNN's flash attention or Pallas splash
attention, by the `implementation` a model config chooses ("auto": by backend).
Attention probabilities are only materialised for the key columns a caller asks for
(`probe`), which is what the cross-attention map loss needs; they are exact (float32,
the same mask) whatever kernel computes the attention itself.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.kernels import attend, factored_mask
from sdjax.models.layers import GroupNorm, constrain, dense


def multi_head_attention(
    q, k, v, heads: int, *, factors=None, is_causal=False, implementation=None
):
    """softmax(q k^T / sqrt(d)) v per head. q `[B, T, H*d]`, k/v `[B, S, H*d]` -> `[B, T, H*d]`.

    factors: an optional factored mask (blocked `[B, T, R]`, groups `[B, S, R]`; see
    `sdjax.models.kernels`).
    """
    b, t, inner = q.shape
    d = inner // heads

    def split(x):
        return x.reshape(x.shape[0], x.shape[1], heads, d)

    out = attend(
        split(q),
        split(k),
        split(v),
        scale=d**-0.5,
        implementation=implementation or "xla",
        factors=factors,
        is_causal=is_causal,
    )
    return out.reshape(b, t, inner)


def attention_probs(q, k, heads: int, columns, factors=None):
    """Head-averaged softmax(q k^T / sqrt(d)) at chosen key columns, in float32.

    q `[B, T, H*d]`, k `[B, S, H*d]`, columns int `[B, K]` -> `[B, T, K]`.
    The softmax runs over all S keys (those the factored mask allows, as in
    `multi_head_attention`); only the K asked-for columns are kept.
    """
    b, t, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, t, heads, d).astype(jnp.float32)
    kh = k.reshape(b, k.shape[1], heads, d).astype(jnp.float32)
    logits = jnp.einsum("bthd,bshd->bhts", qh, kh) / jnp.sqrt(jnp.float32(d))
    if factors is not None:
        logits = jnp.where(factored_mask(*factors), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    picked = jnp.take_along_axis(probs, columns[:, None, None, :], axis=-1)  # [B, H, T, K]
    return picked.mean(axis=1)


class Attention(nn.Module):
    """diffusers `Attention`: queries from x, keys/values from `context` (x when None).

    x `[B, T, D]`, context `[B, S, C]` -> `[B, T, D]`. With `probe` (int `[B, K]` key
    columns) the head-averaged probabilities `[B, T, K]` are sown into the 'attn_probs'
    collection under this module's path.

    With `norm_groups` set (the VAE mid-block form) x is an image `[B, H, W, D]`: it is
    group-normalised (`GroupNorm`), attended over its H*W positions, and added back.

    `factors` (a factored mask, `sdjax.models.kernels`) restricts which keys each query
    sees (`sdjax.models.regions`).
    """

    heads: int
    head_dim: int
    qkv_bias: bool = False
    norm_groups: int | None = None
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x, context=None, probe=None, factors=None):
        if self.norm_groups is not None:
            residual = x
            b, h, w, c = x.shape
            x = GroupNorm(self.norm_groups, self.norm_eps, name="group_norm")(x)
            x = x.reshape(b, h * w, c)
        inner = self.heads * self.head_dim
        context = x if context is None else context
        q = dense(inner, ("embed", "heads"), name="to_q", use_bias=self.qkv_bias, dtype=self.dtype)(
            x
        )
        k = dense(inner, ("embed", "heads"), name="to_k", use_bias=self.qkv_bias, dtype=self.dtype)(
            context
        )
        v = dense(inner, ("embed", "heads"), name="to_v", use_bias=self.qkv_bias, dtype=self.dtype)(
            context
        )
        if probe is not None:
            self.sow("attn_probs", "probs", attention_probs(q, k, self.heads, probe, factors))
        out = multi_head_attention(
            q, k, v, self.heads, factors=factors, implementation=self.implementation
        )
        out = constrain(out, ("batch", "length", "heads"))
        out = dense(x.shape[-1], ("heads", "embed"), name="to_out_0", dtype=self.dtype)(out)
        if self.norm_groups is not None:
            return residual + out.reshape(residual.shape)
        return out


class FeedForward(nn.Module):
    """diffusers `FeedForward` with GEGLU: net.0.proj (D -> 2*mult*D), exact GELU gate, net.2."""

    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        inner = self.mult * x.shape[-1]
        projected = _GEGLUProj(2 * inner, dtype=self.dtype, name="net_0")(x)
        hidden, gate = jnp.split(projected, 2, axis=-1)
        hidden = hidden * nn.gelu(gate, approximate=False)
        hidden = constrain(hidden, ("batch", "length", "mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), name="net_2", dtype=self.dtype)(hidden)


class _GEGLUProj(nn.Module):
    """PyTorch's `GEGLU` module: holds the `proj` Linear of the gated feed-forward."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return dense(self.features, ("embed", "mlp"), name="proj", dtype=self.dtype)(x)
