"""The plain ViT image backbone of DINO (ViT-S/16 gives DreamBench's DINO score, docs/method.md §7).

Computes transformers' `ViTModel` without its pooler (DINO's checkpoints have none):
patch embedding + CLS token + position embeddings, N pre-norm encoder layers, a final
LayerNorm. Images `[B, H, W, 3]` (H = W = the config's `image_size`), normalised with the
config's `mean` / `std` -> (tokens `[B, 1 + P, D]` after the final LayerNorm, CLS feature
`[B, D]` = its first token, the feature DINO similarity compares).

A ViT encoder layer (`layernorm_before`, attention, `layernorm_after`, MLP, two residuals)
computes exactly what CLIP's pre-norm encoder layer does, so the encoder here *is*
`sdjax.models.clip.Encoder` and its parameters carry CLIP's names (`layer_norm1`,
`self_attn.q_proj`, `mlp.fc1`, ...); `sdjax.convert.vit` renames transformers' and
DINO/timm's checkpoint keys onto them with explicit tables. Embeddings and the final norm
keep transformers' names (`embeddings.cls_token`, `embeddings.position_embeddings`,
`embeddings.patch_embeddings.projection`, `layernorm`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from sdjax.errors import UserError
from sdjax.models.clip import Encoder
from sdjax.models.layers import activation, conv, layer_norm, partitioned

# ImageNet statistics: the normalisation DINO was trained and is evaluated with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_OURS = frozenset({"dtype", "remat", "attention_implementation", "mean", "std"})


@dataclass(frozen=True)
class ViTConfig:
    """transformers `ViTConfig` fields that change the forward pass (with its defaults),
    plus preprocessing and compute settings. facebook/dino-vits16: hidden_size 384,
    intermediate_size 1536, 6 heads, 12 layers, patch 16, image 224, layer_norm_eps 1e-6.

    Dropout fields and the pooler's are ignored: dropout is off at inference and DINO
    has no pooler. The encoder fields are named as `sdjax.models.clip.Encoder` reads them.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    # sdjax settings (not in transformers' config):
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dtype: str = "float32"
    remat: bool = False
    attention_implementation: str | None = None

    model_type: ClassVar[str] = "vit"

    def __post_init__(self):
        where = f"{self.model_type} config"
        try:
            activation(self.hidden_act)
        except ValueError as err:
            raise UserError(f"{where}: hidden_act: {err}") from None
        if not self.qkv_bias:
            raise UserError(f"{where}: qkv_bias=False is not supported")
        if self.num_channels != 3:
            raise UserError(f"{where}: num_channels={self.num_channels} (need 3)")
        if self.num_attention_heads < 1 or self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"{where}: hidden_size {self.hidden_size} does not split into "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise UserError(
                f"{where}: image_size {self.image_size} is not a multiple of "
                f"patch_size {self.patch_size}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_transformers(cls, d: dict, **overrides) -> ViTConfig:
        """A transformers `ViTModel` config.json dict (+ sdjax-only overrides)."""
        model_type = d.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise UserError(
                f"model_type {model_type!r} is not {cls.model_type!r}: expected a "
                "transformers ViTModel config"
            )
        names = {f.name for f in dataclasses.fields(cls)} - _OURS
        return cls(**{k: v for k, v in d.items() if k in names}, **overrides)


class PatchEmbeddings(nn.Module):
    """transformers `ViTPatchEmbeddings`: a stride-`patch` convolution, `[B, H, W, 3] ->
    [B, P, D]` row-major over the patch grid (as PyTorch's flatten of `[B, D, h, w]`)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        patches = conv(
            cfg.hidden_size,
            cfg.patch_size,
            name="projection",
            stride=cfg.patch_size,
            padding=0,
            dtype=jnp.dtype(cfg.dtype),
        )(images)
        return patches.reshape(images.shape[0], -1, cfg.hidden_size)


class ViTEmbeddings(nn.Module):
    """transformers `ViTEmbeddings`: `[B, H, W, 3] -> [B, 1 + P, D]` (CLS first).

    `cls_token` `[1, 1, D]` and `position_embeddings` `[1, 1 + P, D]` keep PyTorch's names
    and layouts.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        width, tokens = cfg.hidden_size, cfg.num_patches + 1
        init = partitioned(nn.initializers.normal(0.02), (None, None, "embed"))
        cls = self.param("cls_token", init, (1, 1, width))
        positions = self.param("position_embeddings", init, (1, tokens, width))
        patches = PatchEmbeddings(cfg, name="patch_embeddings")(images)
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (images.shape[0], 1, width))
        return jnp.concatenate([cls, patches], axis=1) + positions


class ViT(nn.Module):
    """`images [B, H, W, 3] -> (tokens [B, 1 + P, D], cls [B, D])`, both after the final
    LayerNorm, as transformers' `ViTModel` (last_hidden_state and its first token)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]}, the ViT takes "
                f"{cfg.image_size}x{cfg.image_size}"
            )
        x = ViTEmbeddings(cfg, name="embeddings")(images)
        x = Encoder(cfg, causal=False, name="encoder")(x)
        x = layer_norm(cfg.layer_norm_eps, name="layernorm")(x)
        return x, x[:, 0]
