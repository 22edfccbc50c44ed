"""The Subject-Diffusion UNet: diffusers' `UNet2DConditionModel` (SD 1.x / 2.x) in Flax.

    UNet(config).apply({"params": p}, sample, timesteps, context, objs=None, probe=None,
                       regions=None)

sample `[B, H, W, C_in]` (C_in = 4 latents + 1 location channel for Subject-Diffusion),
timesteps `[B]`, context `[B, L, D_ctx]` (text tokens), objs `[B, N, D_ctx]` grounding
tokens for the adapters (None: adapters off), probe int `[B, K]` text positions whose
cross-attention maps the `probe_layers` sow into the 'attn_probs' collection, regions
(`sdjax.models.regions.Regions`, or None) the subjects' regions for region-bound attention.
Returns the model output `[B, H, W, C_out]`. Module names mirror diffusers' keys.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from sdjax.models.layers import GroupNorm, conv, dense
from sdjax.models.resnet import Downsample, ResnetBlock, Upsample
from sdjax.models.transformer import Transformer2D
from sdjax.models.unet_config import UNetConfig


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period=10000):
    """Sinusoidal embedding of timesteps `[B]` -> `[B, dim]` (diffusers' `Timesteps`)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
    sin, cos = jnp.sin(args), jnp.cos(args)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        x = dense(self.features, ("embed", "mlp"), name="linear_1")(x)
        return dense(self.features, ("mlp", "embed"), name="linear_2")(nn.silu(x))


class UNetBlock(nn.Module):
    """One resolution level: resnets, each followed by a transformer when `attention`.

    Down levels return their skip outputs; up levels consume them (`skips`, last first).
    """

    config: UNetConfig
    level: int
    out_channels: int
    num_layers: int
    attention: bool
    resample: str | None  # "down", "up" or None

    @nn.compact
    def __call__(self, x, temb, context, objs, probe, regions, skips=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        resnet = nn.remat(ResnetBlock) if cfg.remat else ResnetBlock
        outputs = []
        for i in range(self.num_layers):
            if skips is not None:
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = resnet(
                self.out_channels, cfg.norm_num_groups, cfg.norm_eps, dtype, name=f"resnets_{i}"
            )(x, temb)
            if self.attention:
                x = self._transformer(f"attentions_{i}")(
                    x, context, objs, self._probe(probe), regions
                )
            outputs.append(x)
        if self.resample == "down":
            x = Downsample(dtype=dtype, name="downsamplers_0")(x)
            outputs.append(x)
        elif self.resample == "up":
            x = Upsample(dtype=dtype, name="upsamplers_0")(x)
        return x, outputs

    def _transformer(self, name: str) -> Transformer2D:
        cfg = self.config
        heads = cfg.heads[self.level]
        return Transformer2D(
            heads,
            self.out_channels // heads,
            layers=cfg.transformer_layers_per_block,
            groups=cfg.norm_num_groups,
            linear_projection=cfg.use_linear_projection,
            adapter=cfg.adapter,
            remat=cfg.remat,
            dtype=jnp.dtype(cfg.dtype),
            implementation=cfg.attention_implementation,
            name=name,
        )

    def _probe(self, probe):
        return probe if self.name in self.config.probe_layers else None


class MidBlock(UNetBlock):
    """diffusers `UNetMidBlock2DCrossAttn`: resnet, (transformer, resnet) x 1."""

    @nn.compact
    def __call__(self, x, temb, context, objs, probe, regions, skips=None):
        cfg = self.config
        resnet = nn.remat(ResnetBlock) if cfg.remat else ResnetBlock
        args = (self.out_channels, cfg.norm_num_groups, cfg.norm_eps, jnp.dtype(cfg.dtype))
        x = resnet(*args, name="resnets_0")(x, temb)
        x = self._transformer("attentions_0")(x, context, objs, self._probe(probe), regions)
        return resnet(*args, name="resnets_1")(x, temb), []


class UNet(nn.Module):
    config: UNetConfig

    @nn.compact
    def __call__(self, sample, timesteps, context, objs=None, probe=None, regions=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        channels = cfg.block_out_channels
        levels = len(channels)
        t = timestep_embedding(timesteps, channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(4 * channels[0], name="time_embedding")(t)

        x = conv(channels[0], 3, name="conv_in", dtype=dtype)(sample)
        skips = [x]
        for i, kind in enumerate(cfg.down_block_types):
            x, outs = UNetBlock(
                cfg,
                i,
                channels[i],
                cfg.layers_per_block,
                attention=kind.startswith("CrossAttn"),
                resample="down" if i < levels - 1 else None,
                name=f"down_blocks_{i}",
            )(x, temb, context, objs, probe, regions)
            skips.extend(outs)

        x, _ = MidBlock(cfg, levels - 1, channels[-1], 1, True, None, name="mid_block")(
            x, temb, context, objs, probe, regions
        )

        for i, kind in enumerate(cfg.up_block_types):
            x, _ = UNetBlock(
                cfg,
                levels - 1 - i,
                channels[levels - 1 - i],
                cfg.layers_per_block + 1,
                attention=kind.startswith("CrossAttn"),
                resample="up" if i < levels - 1 else None,
                name=f"up_blocks_{i}",
            )(x, temb, context, objs, probe, regions, skips=skips)

        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out")(x))
        return conv(cfg.out_channels, 3, name="conv_out", dtype=dtype)(x).astype(jnp.float32)


def unet_example_inputs(config: UNetConfig, batch: int = 1, size: int | None = None):
    """Zero inputs with the right shapes (objs included when the UNet has adapters)."""
    size = size or 2 ** (len(config.block_out_channels) - 1)
    return (
        jnp.zeros((batch, size, size, config.in_channels), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch, 1, config.cross_attention_dim), jnp.float32),
        jnp.zeros((batch, 1, config.objs_dim), jnp.float32) if config.adapter else None,
    )


def init_unet(config: UNetConfig, rng):
    """Freshly initialised parameters (with logical-axis metadata boxes)."""
    return UNet(config).init(rng, *unet_example_inputs(config))["params"]
