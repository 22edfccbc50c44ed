"""Convolutional blocks shared by the UNet and the VAE, named as in diffusers (NHWC).

`ResnetBlock` `[B, H, W, C_in]` (+ time embedding `[B, T]`) -> `[B, H, W, C_out]`;
`Downsample` halves H and W; `Upsample` doubles them (nearest, then a 3x3 conv).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sdjax.models.layers import GroupNorm, constrain, conv, dense


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D` (time_embedding_norm 'default', output_scale_factor 1)."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1")(x))
        h = conv(self.out_channels, 3, name="conv1", dtype=self.dtype)(h)
        if temb is not None:
            t = dense(self.out_channels, ("embed", "conv_out"), name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :].astype(h.dtype)
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2")(h))
        h = conv(self.out_channels, 3, name="conv2", dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", dtype=self.dtype)(x)
        return constrain(x + h, ("batch", "height", "width", "channels"))


class Downsample(nn.Module):
    """diffusers `Downsample2D` with a conv: stride 2, padding 1 (UNet) or 0 after a
    right/bottom zero pad (VAE encoder)."""

    padding: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(x.shape[-1], 3, name="conv", stride=2, padding=self.padding, dtype=self.dtype)(
            x
        )


class Upsample(nn.Module):
    """diffusers `Upsample2D` with a conv: nearest-neighbour x2, then a 3x3 conv."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], 3, name="conv", dtype=self.dtype)(x)
