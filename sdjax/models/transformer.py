"""The UNet's spatial transformer, named as in diffusers' `Transformer2DModel`.

`Transformer2D`: image `[B, H, W, C]` -> group norm -> tokens `[B, H*W, C]` -> blocks ->
image, plus the input (residual). Each `BasicTransformerBlock` is

    x = x + SelfAttn(LN1(x))
    x = fuser(x, objs)                       (Subject-Diffusion adapter, when objs given)
    x = x + CrossAttn(LN2(x), context)       context `[B, L, D_ctx]` (text tokens)
    x = x + FF_GEGLU(LN3(x))

`probe` (int `[B, K]`: text positions) makes the cross-attention sow its probabilities at
those positions, `[B, H*W, K]`, for the attention-map loss. `regions`
(`sdjax.models.regions.Regions`) binds each subject's grounding and text tokens to its
region in the fuser's and the cross-attention's softmax.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sdjax.models.adapter import GatedSelfAttention
from sdjax.models.attention import Attention, FeedForward
from sdjax.models.layers import GroupNorm, constrain, conv, dense, layer_norm
from sdjax.models.regions import adapter_factors, cross_factors


class BasicTransformerBlock(nn.Module):
    heads: int
    head_dim: int
    adapter: bool = False
    dtype: jnp.dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x, context, objs=None, probe=None, factors=(None, None)):
        """factors: (the fuser's, the cross-attention's) factored region masks, or None."""
        kw = dict(dtype=self.dtype, implementation=self.implementation)
        objs_factors, text_factors = factors
        x = x + Attention(self.heads, self.head_dim, name="attn1", **kw)(
            layer_norm(1e-5, name="norm1")(x)
        )
        if self.adapter and objs is not None:
            x = GatedSelfAttention(self.heads, self.head_dim, name="fuser", **kw)(
                x, objs, objs_factors
            )
        x = x + Attention(self.heads, self.head_dim, name="attn2", **kw)(
            layer_norm(1e-5, name="norm2")(x), context, probe=probe, factors=text_factors
        )
        x = x + FeedForward(dtype=self.dtype, name="ff")(layer_norm(1e-5, name="norm3")(x))
        return constrain(x, ("batch", "length", "embed"))


class Transformer2D(nn.Module):
    heads: int
    head_dim: int
    layers: int = 1
    groups: int = 32
    linear_projection: bool = False
    adapter: bool = False
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x, context, objs=None, probe=None, regions=None):
        b, h, w, c = x.shape
        residual = x
        factors = (None, None)
        if regions is not None:
            with_objs = self.adapter and objs is not None
            factors = (
                adapter_factors(regions, h, w, objs.shape[1]) if with_objs else None,
                cross_factors(regions, h, w),
            )
        x = GroupNorm(self.groups, 1e-6, name="norm")(x)
        if self.linear_projection:
            x = dense(c, ("embed", "embed_out"), name="proj_in", dtype=self.dtype)(
                x.reshape(b, h * w, c)
            )
        else:
            x = conv(c, 1, name="proj_in", dtype=self.dtype)(x).reshape(b, h * w, c)
        block = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
        for i in range(self.layers):
            x = block(
                self.heads,
                self.head_dim,
                adapter=self.adapter,
                dtype=self.dtype,
                implementation=self.implementation,
                name=f"transformer_blocks_{i}",
            )(x, context, objs, probe, factors)
        if self.linear_projection:
            x = dense(c, ("embed", "embed_out"), name="proj_out", dtype=self.dtype)(x).reshape(
                b, h, w, c
            )
        else:
            x = conv(c, 1, name="proj_out", dtype=self.dtype)(x.reshape(b, h, w, c))
        return x + residual
