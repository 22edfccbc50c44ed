"""Contrastive (CLIP-style) pre-training: the toy world's stand-in for a pretrained CLIP.

Subject-Diffusion encodes references with a frozen, pretrained CLIP image tower
(docs/method.md §2, §3b).
No such weights exist for the toy world, so sdjax trains its own with `config.task =
"clip"` (`configs/toy_clip.py`): pairs of one subject's augmented reference view and its
description ("a red striped star"), symmetric InfoNCE with a learned temperature, the
usual CLIP recipe. Identical descriptions in a batch count as positives of each other
(the toy world repeats attribute combinations), so the loss does not push them apart.

The trained image tower becomes the Subject-Diffusion model's frozen image encoder
(`init.image_encoder = <this run's workdir>`, read by `sdjax.models.clip_model.image_tower`),
and doubles as the toy CLIP-I metric model. Batch: image `[B, S, S, 3]` (normalised), ids
`[B, L]`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from sdjax.models.clip import CLIPTextConfig, CLIPVisionConfig
from sdjax.models.clip_model import CLIPConfig, CLIPModel
from sdjax.models.layers import unbox
from sdjax.train.state import flatten, learning_rate, unflatten
from sdjax.train.step import make_step
from sdjax.train.tasks.vocabulary import text_with_vocabulary


def clip_config(config) -> tuple[CLIPConfig, object]:
    """(CLIPConfig, tokenizer) from `config.model.text` / `.image` / `.vocab`."""
    text, tokenizer = text_with_vocabulary(dict(config.model.text), config.model.get("vocab"))
    attention = {"attention_implementation": config.model.get("attention", "auto")}
    text = CLIPTextConfig(**{**text, **attention})
    return CLIPConfig(text, CLIPVisionConfig(**{**config.model.image, **attention})), tokenizer


def contrastive_losses(config: CLIPConfig):
    model = CLIPModel(config)

    def losses(trainable, frozen, batch, rng):
        params = unflatten({**trainable, **frozen})
        logits = model.apply({"params": params}, batch["image"], batch["ids"])  # [B, B]
        ids = batch["ids"]
        same = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1).astype(jnp.float32)
        targets = same / jnp.sum(same, axis=-1, keepdims=True)  # symmetric: same.T == same
        image_loss = optax.softmax_cross_entropy(logits, targets).mean()
        text_loss = optax.softmax_cross_entropy(logits.T, targets).mean()
        hit = jnp.take_along_axis(same, jnp.argmax(logits, axis=-1)[:, None], axis=-1)
        return (image_loss + text_loss) / 2, {"accuracy": hit.mean()}

    return losses


class ClipTask:
    def __init__(self, config):
        self.config = config
        self.clip, self.tokenizer = clip_config(config)
        vision = self.clip.vision
        self.meta = {
            "task": "clip",
            "clip": {
                "text": dataclasses.asdict(self.clip.text),
                "vision": dataclasses.asdict(vision),
            },
            "vocab_subset": list(self.tokenizer.vocab_subset or []),
        }
        self.boxed = flatten(jax.eval_shape(self.init_boxed, jax.random.key(0)))

    def _example(self):
        size, length = self.clip.vision.image_size, self.clip.text.max_position_embeddings
        return jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32)

    def init_boxed(self, key) -> dict:
        return CLIPModel(self.clip).init(key, *self._example())["params"]

    def batch_spec(self, batch: int) -> dict:
        size, length = self.clip.vision.image_size, self.clip.text.max_position_embeddings
        return {
            "image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
            "ids": jax.ShapeDtypeStruct((batch, length), jnp.int32),
        }

    def step(self, tx):
        return make_step(contrastive_losses(self.clip), tx, learning_rate(self.config.train), 0.0)

    def init_flat(self, key) -> dict:
        return flatten(unbox(self.init_boxed(key)))

    def pretrained_flat(self, fresh: dict) -> dict:
        return {}

    def inputs(self, workdir: str, local_batch: int) -> tuple:
        from sdjax.data.loader import LoaderConfig, make_record_loader
        from sdjax.data.transforms import ContrastiveTransform
        from sdjax.train.tasks.records import prepare_data

        config, vision = self.config, self.clip.vision
        data = LoaderConfig.from_dict(
            {**config.data.to_dict(), "path": prepare_data(config, workdir)}
        )
        transform = ContrastiveTransform(
            data.example, vision.image_size, vision.mean, vision.std, self.tokenizer
        )
        loader = make_record_loader(data, transform, batch_size=local_batch, seed=config.train.seed)
        return loader, None
