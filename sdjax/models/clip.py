"""The CLIP transformer encoder shared by the text and image towers, and their configs.

Token tensors are `[B, T, D]` (D = hidden_size). Modules and parameters are named as in
transformers' CLIP (`encoder.layers.N.self_attn.q_proj`, `mlp.fc1`, ...), so checkpoints
map onto them 1:1 through `sdjax.convert.clip`. One pre-norm layer serves both towers:
the text tower runs it causally, the image tower bidirectionally.

The configs mirror the fields of transformers' `CLIPTextConfig` / `CLIPVisionConfig`
that change the computation (with transformers' defaults, so a config.json that omits a
field means the same here); the other keys of a transformers config (initialisation,
generic `PretrainedConfig` switches) do not change the forward pass and are ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from sdjax.errors import UserError
from sdjax.models.attention import multi_head_attention
from sdjax.models.layers import activation, constrain, dense, layer_norm

# OpenAI CLIP's image normalisation, also used by OpenCLIP ViT-H-14.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_ACTIVATIONS = ("quick_gelu", "gelu")  # OpenAI CLIP / SD 1.x, OpenCLIP / SD 2.x
# Config fields that are sdjax's, not transformers'.
_OURS = frozenset({"dtype", "remat", "attention_implementation", "mean", "std"})


@dataclass(frozen=True)
class CLIPTextConfig:
    """transformers `CLIPTextConfig` (its defaults), plus sdjax's compute settings."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    # sdjax settings (not in transformers' math):
    dtype: str = "float32"  # compute dtype of matmuls
    remat: bool = False  # gradient checkpointing of every encoder layer
    attention_implementation: str | None = None  # None (XLA) or a `kernels` name

    model_type: ClassVar[str] = "clip_text_model"
    architecture: ClassVar[str] = "CLIPTextModel"

    def __post_init__(self):
        _check_encoder(self)
        if not isinstance(self.eos_token_id, int):
            raise UserError(f"{self.model_type} config: eos_token_id must be an integer")

    @classmethod
    def from_transformers(cls, d: dict, **overrides) -> CLIPTextConfig:
        """A transformers `CLIPTextModel` config.json dict (+ sdjax-only overrides)."""
        return _from_transformers(cls, d, overrides)

    def to_transformers(self) -> dict:
        """The config.json dict `transformers.CLIPTextModel.from_pretrained` reads."""
        return _to_transformers(self)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers `CLIPVisionConfig` (its defaults), plus preprocessing and compute settings.

    `image_size`, `mean` and `std` say how a sampler prepares images: RGB in [0, 1],
    resized to `image_size` square, then `(x - mean) / std` per channel.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # sdjax settings (not in transformers' config):
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    dtype: str = "float32"
    remat: bool = False
    attention_implementation: str | None = None

    model_type: ClassVar[str] = "clip_vision_model"
    architecture: ClassVar[str] = "CLIPVisionModelWithProjection"

    def __post_init__(self):
        _check_encoder(self)
        if self.num_channels != 3:
            raise UserError(f"{self.model_type} config: num_channels={self.num_channels} (need 3)")
        if self.image_size % self.patch_size:
            raise UserError(
                f"{self.model_type} config: image_size {self.image_size} is not a multiple "
                f"of patch_size {self.patch_size}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_transformers(cls, d: dict, **overrides) -> CLIPVisionConfig:
        """A transformers `CLIPVisionModelWithProjection` config.json dict (+ overrides)."""
        return _from_transformers(cls, d, overrides)

    def to_transformers(self) -> dict:
        """The config.json dict `transformers.CLIPVisionModelWithProjection` reads."""
        return _to_transformers(self)


EncoderConfig = CLIPTextConfig | CLIPVisionConfig


def _check_encoder(cfg: EncoderConfig) -> None:
    where = f"{cfg.model_type} config"
    if cfg.hidden_act not in _ACTIVATIONS:
        raise UserError(
            f"{where}: unsupported hidden_act {cfg.hidden_act!r}; known: {_ACTIVATIONS}"
        )
    if cfg.num_attention_heads < 1 or cfg.hidden_size % cfg.num_attention_heads:
        raise UserError(
            f"{where}: hidden_size {cfg.hidden_size} does not split into "
            f"num_attention_heads {cfg.num_attention_heads}"
        )


def _from_transformers(cls, d: dict, overrides: dict):
    model_type = d.get("model_type", cls.model_type)
    if model_type != cls.model_type:
        raise UserError(
            f"model_type {model_type!r} is not {cls.model_type!r}: expected a "
            f"transformers {cls.architecture} config"
        )
    dropout = d.get("attention_dropout", 0.0)
    if dropout:
        raise UserError(
            f"{cls.model_type} config: unsupported attention_dropout={dropout} (only 0)"
        )
    names = {f.name for f in dataclasses.fields(cls)} - _OURS
    return cls(**{k: v for k, v in d.items() if k in names}, **overrides)


def _to_transformers(cfg: EncoderConfig) -> dict:
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _OURS}
    d.update(
        architectures=[cfg.architecture],
        model_type=cfg.model_type,
        attention_dropout=0.0,
        torch_dtype="float32",
    )
    return d


class SelfAttention(nn.Module):
    """transformers `CLIPAttention`: q/k/v/out projections, all with bias, `[B,T,D] -> [B,T,D]`."""

    heads: int
    causal: bool = False
    dtype: jnp.dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        q, k, v = (
            dense(width, ("embed", "heads"), name=name, dtype=self.dtype)(x)
            for name in ("q_proj", "k_proj", "v_proj")
        )
        out = multi_head_attention(
            q, k, v, self.heads, is_causal=self.causal, implementation=self.implementation
        )
        out = constrain(out, ("batch", "length", "heads"))
        return dense(width, ("heads", "embed"), name="out_proj", dtype=self.dtype)(out)


class MLP(nn.Module):
    """transformers `CLIPMLP`: fc1 (D -> intermediate), activation, fc2 (back to D)."""

    intermediate_size: int
    act: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = dense(self.intermediate_size, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x)
        h = constrain(activation(self.act)(h), ("batch", "length", "mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), name="fc2", dtype=self.dtype)(h)


class EncoderLayer(nn.Module):
    """transformers `CLIPEncoderLayer`: pre-norm self-attention and MLP, each residual."""

    config: EncoderConfig
    causal: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        h = layer_norm(cfg.layer_norm_eps, name="layer_norm1")(x)
        x = x + SelfAttention(
            cfg.num_attention_heads,
            self.causal,
            dtype,
            cfg.attention_implementation,
            name="self_attn",
        )(h)
        h = layer_norm(cfg.layer_norm_eps, name="layer_norm2")(x)
        x = x + MLP(cfg.intermediate_size, cfg.hidden_act, dtype, name="mlp")(h)
        return constrain(x, ("batch", "length", "embed"))


class Encoder(nn.Module):
    """transformers `CLIPEncoder`: `layers_0 .. layers_{N-1}`, `[B, T, D] -> [B, T, D]`.

    With `config.remat` each layer's activations are recomputed in the backward pass
    instead of stored (the parameter tree is the same either way).
    """

    config: EncoderConfig
    causal: bool = False

    @nn.compact
    def __call__(self, x):
        layer = nn.remat(EncoderLayer) if self.config.remat else EncoderLayer
        for i in range(self.config.num_hidden_layers):
            x = layer(self.config, self.causal, name=f"layers_{i}")(x)
        return x
