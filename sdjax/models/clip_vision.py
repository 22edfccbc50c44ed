"""The image encoder: CLIP's vision tower with its projection (docs/method.md §2, §3b).

Laid out as transformers' `CLIPVisionModelWithProjection` (`vision_model.embeddings`,
`vision_model.pre_layrnorm` (sic), `vision_model.encoder`, `vision_model.post_layernorm`,
`visual_projection`); OpenCLIP ViT-H-14 checkpoints load into it through
`sdjax.convert.open_clip`. Images `[B, H, W, 3]` (H = W = the config's `image_size`),
already normalised with the config's `mean` / `std` -> patch tokens `[B, P, D]`
(P = (H / patch)^2, the last block's output before `post_layernorm`) and the projected
CLS embedding `[B, projection_dim]`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sdjax.models.clip import CLIPVisionConfig, Encoder
from sdjax.models.layers import conv, dense, embedding, layer_norm, partitioned


class VisionEmbeddings(nn.Module):
    """transformers `CLIPVisionEmbeddings`: `[B, H, W, 3] -> [B, 1 + P, D]` (CLS first)."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        width, batch = cfg.hidden_size, images.shape[0]
        patches = conv(
            width,
            cfg.patch_size,
            name="patch_embedding",
            stride=cfg.patch_size,
            padding=0,
            use_bias=False,
            dtype=jnp.dtype(cfg.dtype),
        )(images)
        # Row-major over the patch grid, as PyTorch's flatten of `[B, D, h, w]`.
        patches = patches.reshape(batch, -1, width)
        cls = self.param(
            "class_embedding", partitioned(nn.initializers.normal(0.02), ("embed",)), (width,)
        )
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (batch, 1, width))
        positions = embedding(
            cfg.num_patches + 1, width, (None, "embed"), name="position_embedding"
        )(jnp.arange(cfg.num_patches + 1))
        return jnp.concatenate([cls, patches], axis=1) + positions[None]


class VisionTransformer(nn.Module):
    """transformers `CLIPVisionTransformer`: `[B, H, W, 3]` -> (tokens `[B, 1 + P, D]` from
    the last encoder layer, post-layer-normed CLS `[B, D]`)."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        x = VisionEmbeddings(cfg, name="embeddings")(images)
        x = layer_norm(cfg.layer_norm_eps, name="pre_layrnorm")(x)
        x = Encoder(cfg, causal=False, name="encoder")(x)
        return x, layer_norm(cfg.layer_norm_eps, name="post_layernorm")(x[:, 0])


class ImageEncoder(nn.Module):
    """`images [B, H, W, 3] -> (patch_tokens [B, P, D], cls_embed [B, projection_dim])`."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]}, the encoder takes "
                f"{cfg.image_size}x{cfg.image_size}"
            )
        tokens, cls = VisionTransformer(cfg, name="vision_model")(images)
        cls_embed = dense(
            cfg.projection_dim,
            ("embed", None),
            name="visual_projection",
            use_bias=False,
            dtype=jnp.dtype(cfg.dtype),
        )(cls)
        return tokens[:, 1:], cls_embed.astype(jnp.float32)
