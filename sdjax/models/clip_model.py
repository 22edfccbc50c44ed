"""CLIP's contrastive model: the image and text towers with their projections.

`CLIPModel` mirrors transformers' `CLIPModel` (parameter paths are its keys), so the
DreamBench metric loaders (`sdjax.eval.metric_models`) and the toy CLIP trainer
(`sdjax.train.tasks.clip`) share it. Images `[B, S, S, 3]` (normalised) -> image
embeddings `[B, E]`; token ids `[B, L]` -> text embeddings `[B, E]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.errors import UserError
from sdjax.models.clip import CLIPTextConfig, CLIPVisionConfig
from sdjax.models.clip_text import TextEncoder
from sdjax.models.clip_vision import ImageEncoder
from sdjax.models.layers import dense, partitioned

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


IMAGE_PARTS = ("vision_model", "visual_projection")  # the image tower inside CLIPModel


def image_tower(meta: dict, flat: dict) -> tuple[CLIPVisionConfig, dict]:
    """The image tower of a CLIP training run (`meta` and flat 'part/path' params, as
    `sdjax.checkpoint.restore_params` gives them) as `ImageEncoder` (config, params)."""
    from sdjax.train.state import unflatten

    config = CLIPVisionConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["clip"]["vision"].items()}
    )
    tower = {k: v for k, v in flat.items() if k.split("/")[0] in IMAGE_PARTS}
    return config, unflatten(tower)
