"""The KL autoencoder of Stable Diffusion 1.5 / 2.x (diffusers `AutoencoderKL`), NHWC.

Images `[B, H, W, in_channels]` in [-1, 1] encode to a diagonal Gaussian posterior over
latents `[B, H/f, W/f, latent_channels]`, f = 2 ** (len(block_out_channels) - 1);
`decode` maps (unscaled) latents back to images. The diffusion model works on *scaled*
latents, `(z - shift_factor) * scaling_factor`; `scale_latents` / `unscale_latents` go
between the two, and the `images_to_latents` / `latents_to_images` methods do the whole
trip as SD pipelines do. Submodule names mirror diffusers' state-dict keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.errors import UserError
from sdjax.models.attention import Attention
from sdjax.models.layers import GroupNorm, conv
from sdjax.models.resnet import Downsample, ResnetBlock, Upsample

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
_EPS = 1e-6  # every norm of diffusers' Encoder/Decoder, attention's included
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp
# config.json keys with no effect on the model's math (latents_mean/std only when null).
_IGNORED_KEYS = frozenset({"force_upcast"})
_NULL_ONLY_KEYS = frozenset({"latents_mean", "latents_std"})
_OURS = frozenset({"dtype"})  # VAEConfig fields that are sdjax's, not diffusers'


@dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' AutoencoderKL config that shape the model (its defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (_UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # sdjax's setting (not diffusers'): compute dtype of convolutions and matmuls.
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels", "sample_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._check()

    def _check(self):
        n = len(self.block_out_channels)
        for name, kind in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
            types = getattr(self, name)
            if len(types) != n:
                _reject(name, f"has {len(types)} entries, block_out_channels has {n}")
            for i, t in enumerate(types):
                if t != kind:
                    _reject(f"{name}[{i}]", f"{t!r} is not supported (only {kind!r})")
        if self.act_fn != "silu":
            _reject("act_fn", f"{self.act_fn!r} is not supported (only 'silu')")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                _reject(
                    "block_out_channels",
                    f"entry {c} is not divisible by norm_num_groups={self.norm_num_groups}",
                )
        if self.layers_per_block < 1:
            _reject("layers_per_block", f"{self.layers_per_block} is not >= 1")

    @classmethod
    def from_diffusers(cls, d: dict) -> VAEConfig:
        """From a diffusers AutoencoderKL config.json dict; unsupported values raise."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in _NULL_ONLY_KEYS:
                if value is not None:
                    _reject(key, f"{value!r} is not supported (only null)")
                continue
            if key not in fields or key in _OURS:
                _reject(key, "is not a known AutoencoderKL option")
            kwargs[key] = value
        return cls(**kwargs)

    def to_diffusers(self) -> dict:
        """A dict `diffusers.AutoencoderKL.from_config` accepts."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"_class_name": "AutoencoderKL", **{k: v for k, v in d.items() if k not in _OURS}}

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along H and W."""
        return 2 ** (len(self.block_out_channels) - 1)


def _reject(field: str, problem: str):
    raise UserError(f"VAE config: {field} {problem}")


def scale_latents(config: VAEConfig, z):
    """Posterior latents -> the latents the diffusion model sees."""
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(config: VAEConfig, latents):
    """The diffusion model's latents -> latents `decode` takes."""
    return latents / config.scaling_factor + (config.shift_factor or 0.0)


def sample_posterior(rng, mean, logvar):
    """A draw from N(mean, exp(logvar)), logvar clipped to diffusers' range."""
    std = jnp.exp(0.5 * jnp.clip(logvar, *_LOGVAR_RANGE))
    return mean + std * jax.random.normal(rng, mean.shape, mean.dtype)


class _MidBlock(nn.Module):
    """diffusers `UNetMidBlock2D` without time embedding: resnet, [attention], resnet."""

    groups: int
    add_attention: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, _EPS, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            attention = Attention(
                heads=1,
                head_dim=c,
                qkv_bias=True,
                norm_groups=self.groups,
                norm_eps=_EPS,
                dtype=self.dtype,
                name="attentions_0",
            )
            x = attention(x)
        return ResnetBlock(c, self.groups, _EPS, self.dtype, name="resnets_1")(x)


class _ResnetStack(nn.Module):
    """`num_layers` resnets then an optional resampler: `DownEncoderBlock2D` (resample
    'down', padding-0 `Downsample` named downsamplers_0) or `UpDecoderBlock2D` ('up')."""

    channels: int
    num_layers: int
    groups: int
    resample: str | None
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.channels, self.groups, _EPS, self.dtype, name=f"resnets_{j}")(x)
        if self.resample == "down":
            x = Downsample(padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample(dtype=self.dtype, name="upsamplers_0")(x)
        return x


def _norm_act_conv(config: VAEConfig, x, out_channels: int, dtype):
    """The shared tail of the encoder and decoder: GroupNorm, SiLU, 3x3 conv."""
    x = nn.silu(GroupNorm(config.norm_num_groups, _EPS, name="conv_norm_out")(x))
    return conv(out_channels, 3, name="conv_out", dtype=dtype)(x)


class Encoder(nn.Module):
    """diffusers `Encoder` (double_z): images `[B, H, W, C]` -> `[B, h, w, 2 * latent]`."""

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        channels = cfg.block_out_channels
        x = conv(channels[0], 3, name="conv_in", dtype=self.dtype)(x)
        for i, c in enumerate(channels):
            resample = "down" if i < len(channels) - 1 else None
            block = _ResnetStack(
                c,
                cfg.layers_per_block,
                cfg.norm_num_groups,
                resample,
                self.dtype,
                name=f"down_blocks_{i}",
            )
            x = block(x)
        x = _MidBlock(
            cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype, name="mid_block"
        )(x)
        return _norm_act_conv(cfg, x, 2 * cfg.latent_channels, self.dtype)


class Decoder(nn.Module):
    """diffusers `Decoder` (group norm): latents `[B, h, w, latent]` -> `[B, H, W, C]`.

    Up blocks run from the widest channels to the narrowest, each with
    `layers_per_block + 1` resnets.
    """

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        channels = tuple(reversed(cfg.block_out_channels))
        x = conv(channels[0], 3, name="conv_in", dtype=self.dtype)(z)
        x = _MidBlock(
            cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype, name="mid_block"
        )(x)
        for i, c in enumerate(channels):
            resample = "up" if i < len(channels) - 1 else None
            block = _ResnetStack(
                c,
                cfg.layers_per_block + 1,
                cfg.norm_num_groups,
                resample,
                self.dtype,
                name=f"up_blocks_{i}",
            )
            x = block(x)
        return _norm_act_conv(cfg, x, cfg.out_channels, self.dtype)


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL`. Use `encode` / `decode` (or the latent helpers) through
    `apply(..., method=...)`; `__call__` (encode, then decode the mean) initialises every
    parameter."""

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype, name="encoder")
        self.decoder = Decoder(cfg, self.dtype, name="decoder")
        latent = cfg.latent_channels
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * latent, 1, name="quant_conv", dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(latent, 1, name="post_quant_conv", dtype=self.dtype)

    def encode(self, x):
        """Images `[B, H, W, C]` in [-1, 1] -> posterior (mean, logvar), each `[B, h, w, latent]`.

        logvar is clipped as diffusers' posterior clips it.
        """
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode(self, z):
        """Unscaled latents `[B, h, w, latent]` -> images `[B, H, W, C]` (about [-1, 1])."""
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def images_to_latents(self, x, rng=None):
        """Images `[B, H, W, C]` -> the diffusion model's (scaled) latents: a posterior draw
        per image with its own key (rng: keys `[B]`), or the posterior mean (rng None).
        The batch is encoded at once; only the draws are per image."""
        mean, logvar = self.encode(x)
        z = mean if rng is None else jax.vmap(sample_posterior)(rng, mean, logvar)
        return scale_latents(self.config, z)

    def latents_to_images(self, latents):
        """The diffusion model's (scaled) latents -> images."""
        return self.decode(unscale_latents(self.config, latents))

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)
