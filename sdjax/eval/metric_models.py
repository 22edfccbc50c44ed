"""The networks behind DreamBench's scores (SPEC 7), loaded from user-supplied checkpoints.

- DINO (the "DINO" image similarity): `sdjax.models.vit.ViT` (ViT-S/16 in the protocol)
  from a transformers `ViTModel` folder or a timm / official DINO safetensors file
  (`load_dino`, readers in `sdjax.convert.vit`).
- CLIP (CLIP-I and CLIP-T): `CLIPModel`, the image and text towers with their
  projections (ViT-B/32 is the common choice, ViT-L/14 is reported too), from a
  transformers `CLIPModel` folder or a whole open_clip CLIP model saved as safetensors
  (`load_clip`). Images `[B, S, S, 3]` normalised with the vision config's mean/std ->
  image embeddings `[B, E]`; token ids `[B, L]` -> text embeddings `[B, E]` (projected,
  not normalised), exactly as transformers' `get_image_features` / `get_text_features`
  and open_clip's `encode_image` / `encode_text`.

Loaders return (config, float32 numpy params). No weights ship with sdjax.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.convert.clip import read_config, without_position_ids
from sdjax.convert.files import CheckpointError, read_safetensors, read_weights
from sdjax.convert.keys import KeyTable, torch_to_flax
from sdjax.convert.open_clip import image_encoder_from_open_clip, text_encoder_from_open_clip
from sdjax.convert.vit import vit_from_timm, vit_from_transformers
from sdjax.errors import UserError
from sdjax.models.clip import CLIPTextConfig, CLIPVisionConfig
from sdjax.models.clip_text import TextEncoder
from sdjax.models.clip_vision import ImageEncoder
from sdjax.models.layers import dense, partitioned
from sdjax.models.vit import ViTConfig

WEIGHTS = "model.safetensors"
# Our CLIPModel's parameter paths are transformers' CLIPModel keys.
CLIP_KEYS = KeyTable(lists=frozenset({"layers"}))
_LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature (only for fresh init)


@dataclass(frozen=True)
class CLIPConfig:
    """transformers `CLIPConfig`: the two towers; the vision config's `projection_dim` is
    the shared embedding width E."""

    text: CLIPTextConfig
    vision: CLIPVisionConfig

    model_type: ClassVar[str] = "clip"

    @property
    def projection_dim(self) -> int:
        return self.vision.projection_dim

    @classmethod
    def from_transformers(cls, d: dict) -> CLIPConfig:
        """A transformers `CLIPModel` config.json dict.

        Its sub-configs carry their own, unused `projection_dim` (transformers' default
        512); the top-level one is what both projections have.
        """
        model_type = d.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise UserError(
                f"model_type {model_type!r} is not {cls.model_type!r}: expected a "
                "transformers CLIPModel config"
            )
        vision = {**(d.get("vision_config") or {}), "projection_dim": d.get("projection_dim", 512)}
        return cls(
            text=CLIPTextConfig.from_transformers(d.get("text_config") or {}),
            vision=CLIPVisionConfig.from_transformers(vision),
        )


class CLIPModel(nn.Module):
    """transformers `CLIPModel`; parameters named as its keys (`vision_model.*`,
    `visual_projection`, `text_model.*`, `text_projection`, `logit_scale`).

    Methods: `image_embeds(images [B, S, S, 3]) -> [B, E]`, `text_embeds(input_ids [B, L])
    -> [B, E]` (float32, not normalised); calling the model gives `logits_per_image`
    `[B_images, B_texts]` = exp(logit_scale) * cosine similarity.
    """

    config: CLIPConfig

    def setup(self):
        cfg = self.config
        self.image_encoder = ImageEncoder(cfg.vision)
        # Its parameters (vision_model, visual_projection) sit at this level, as in
        # transformers' CLIPModel, so one key table maps the whole model.
        nn.share_scope(self, self.image_encoder)
        self.text_model = TextEncoder(cfg.text)
        self.text_projection = dense(
            cfg.projection_dim,
            ("embed", None),
            name="text_projection",
            use_bias=False,
            dtype=jnp.dtype(cfg.text.dtype),
        )
        self.logit_scale = self.param(
            "logit_scale", partitioned(nn.initializers.constant(_LOGIT_SCALE_INIT), ()), ()
        )

    def image_embeds(self, images):
        return self.image_encoder(images)[1]

    def text_embeds(self, input_ids):
        return self.text_projection(self.text_model(input_ids)[1]).astype(jnp.float32)

    def __call__(self, images, input_ids):
        image, text = (_unit(e) for e in (self.image_embeds(images), self.text_embeds(input_ids)))
        return jnp.exp(self.logit_scale) * image @ text.T


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def abstract_clip_params(config: CLIPConfig):
    """The CLIP model's parameter tree as ShapeDtypeStructs (nothing is allocated)."""
    size = config.vision.image_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, config.text.max_position_embeddings), jnp.int32)
    return jax.eval_shape(CLIPModel(config).init, jax.random.key(0), images, ids)["params"]


def clip_from_transformers(folder: str) -> tuple[CLIPConfig, dict]:
    """A transformers `CLIPModel` folder -> (config, float32 numpy params of `CLIPModel`)."""
    config = read_config(folder, CLIPConfig)
    state = without_position_ids(read_weights(folder, WEIGHTS))
    return config, torch_to_flax(state, abstract_clip_params(config), CLIP_KEYS, what=folder)


def clip_from_open_clip(
    path: str, *, heads: int | None = None, text_heads: int | None = None, act: str = "gelu"
) -> tuple[CLIPConfig, dict]:
    """A whole open_clip CLIP model (safetensors) -> (config, float32 params of `CLIPModel`).

    heads / text_heads: attention heads of each tower (defaults: see
    `sdjax.convert.open_clip`); act: "gelu" (OpenCLIP-trained) or "quick_gelu"
    (OpenAI-trained and `-quickgelu` models), for both towers. The head is open_clip's
    `text_projection` `[width, E]` (applied as `x @ P`, our Dense kernel's layout) and
    `logit_scale` (a scalar or `[1]`).
    """
    vision, image_params = image_encoder_from_open_clip(path, heads=heads, act=act)
    text, text_params = text_encoder_from_open_clip(path, heads=text_heads, act=act)
    config = CLIPConfig(text=text, vision=vision)
    head = _open_clip_head(read_safetensors(path), config, path)
    return config, {**image_params, "text_model": text_params, **head}


def _open_clip_head(state: dict, config: CLIPConfig, path: str) -> dict:
    for key in ("text_projection", "logit_scale"):
        if key not in state:
            raise CheckpointError(f"{path}: missing key {key!r}")
    projection, scale = state["text_projection"], state["logit_scale"]
    want = (config.text.hidden_size, config.projection_dim)
    if projection.shape != want:
        raise CheckpointError(
            f"{path}: key 'text_projection' has shape {projection.shape}, expected {want}"
        )
    if scale.size != 1:
        raise CheckpointError(f"{path}: key 'logit_scale' has shape {scale.shape}, not a scalar")
    return {
        "text_projection": {"kernel": np.asarray(projection, np.float32)},
        "logit_scale": np.asarray(scale, np.float32).reshape(()),
    }


def load_dino(path: str, **timm_options) -> tuple[ViTConfig, dict]:
    """DINO's ViT from a transformers `ViTModel` folder or a timm / DINO safetensors file.

    timm_options (`heads`) are for files only: a folder's config.json says them.
    """
    if os.path.isdir(path):
        _no_options(path, timm_options)
        return vit_from_transformers(path)
    return vit_from_timm(path, **timm_options)


def load_clip(path: str, **open_clip_options) -> tuple[CLIPConfig, dict]:
    """CLIP from a transformers `CLIPModel` folder or an open_clip safetensors file.

    open_clip_options (`heads`, `text_heads`, `act`; see `clip_from_open_clip`) are for
    files only: a folder's config.json says them.
    """
    if os.path.isdir(path):
        _no_options(path, open_clip_options)
        return clip_from_transformers(path)
    return clip_from_open_clip(path, **open_clip_options)


def _no_options(folder: str, options: dict) -> None:
    if options:
        raise UserError(
            f"{folder} is a transformers folder: its config.json gives the architecture, "
            f"drop {', '.join(sorted(options))}"
        )
