"""The Subject-Diffusion adapter: GLIGEN gated self-attention over visual + object tokens.

Inserted in every transformer block between self- and cross-attention (docs/method.md §3b):

    o = Linear(objs)                                  objs `[B, N, D_obj]` -> `[B, N, D]`
    x = x + tanh(a_attn)  * SelfAttn(LN1([x, o]))[:, :T]      x `[B, T, D]`
    x = x + tanh(a_dense) * FF_GEGLU(LN2(x))

`factors` (a factored mask: `regions.adapter_factors`) binds each subject's tokens to
its region. Both gates start at 0, so a fresh adapter is the identity. Names follow diffusers'
`GatedSelfAttentionDense` (`fuser` in a `BasicTransformerBlock`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sdjax.models.attention import Attention, FeedForward
from sdjax.models.layers import dense, layer_norm, partitioned


class GatedSelfAttention(nn.Module):
    heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x, objs, factors=None):
        n_visual, width = x.shape[1], x.shape[-1]
        gate_init = partitioned(nn.initializers.zeros_init(), ())
        alpha_attn = self.param("alpha_attn", gate_init, ())
        alpha_dense = self.param("alpha_dense", gate_init, ())
        o = dense(width, ("embed", "embed_out"), name="linear", dtype=self.dtype)(objs)
        tokens = layer_norm(1e-5, name="norm1")(jnp.concatenate([x, o.astype(x.dtype)], axis=1))
        attended = Attention(
            self.heads,
            self.head_dim,
            dtype=self.dtype,
            implementation=self.implementation,
            name="attn",
        )(tokens, factors=factors)
        x = x + jnp.tanh(alpha_attn) * attended[:, :n_visual]
        dense_out = FeedForward(dtype=self.dtype, name="ff")(layer_norm(1e-5, name="norm2")(x))
        return x + jnp.tanh(alpha_dense) * dense_out
