"""Contrastive (CLIP-style) pre-training: the toy world's stand-in for a pretrained CLIP.

Subject-Diffusion encodes references with a frozen, pretrained CLIP image tower (SPEC 3b).
No such weights exist for the toy world, so sdjax trains its own with `config.task =
"clip"` (`configs/toy_clip.py`): pairs of one subject's augmented reference view and its
description ("a red striped star"), symmetric InfoNCE with a learned temperature, the
usual CLIP recipe. Identical descriptions in a batch count as positives of each other
(the toy world repeats attribute combinations), so the loss does not push them apart.

The trained image tower becomes the Subject-Diffusion model's frozen image encoder
(`init.image_encoder = <this run's workdir>`), and doubles as the toy CLIP-I metric model.
Batch: image `[B, S, S, 3]` (normalised), ids `[B, L]`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from sdjax.eval.metric_models import CLIPConfig, CLIPModel
from sdjax.models.clip import CLIPTextConfig, CLIPVisionConfig
from sdjax.models.layers import unbox
from sdjax.train.init import text_with_vocabulary
from sdjax.train.state import flatten, learning_rate, unflatten
from sdjax.train.step import make_step

IMAGE_PARTS = ("vision_model", "visual_projection")  # the image tower inside CLIPModel


def clip_config(config) -> tuple[CLIPConfig, object]:
    """(CLIPConfig, tokenizer) from `config.model.text` / `.image` / `.vocab`."""
    text, tokenizer = text_with_vocabulary(dict(config.model.text), config.model.get("vocab"))
    return CLIPConfig(
        CLIPTextConfig(**text), CLIPVisionConfig(**dict(config.model.image))
    ), tokenizer


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


def setup_clip_run(config, workdir: str, mesh, rules, local_batch: int):
    from sdjax.data.loader import LoaderConfig, make_record_loader
    from sdjax.data.transforms import ContrastiveTransform
    from sdjax.train.setup import build_run, prepare_data

    clip, tokenizer = clip_config(config)
    data_path = prepare_data(config, workdir)
    data = LoaderConfig.from_dict({**config.data.to_dict(), "path": data_path})
    vision = clip.vision
    transform = ContrastiveTransform(data, vision.image_size, vision.mean, vision.std, tokenizer)
    loader = make_record_loader(data, transform, batch_size=local_batch, seed=config.train.seed)
    size, length = vision.image_size, clip.text.max_position_embeddings
    example = (jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32))
    batch = config.train.batch_size

    def init_flat(key):
        return flatten(unbox(CLIPModel(clip).init(key, *example)["params"]))

    return build_run(
        config,
        mesh,
        rules,
        meta={
            "task": "clip",
            "clip": {"text": dataclasses.asdict(clip.text), "vision": dataclasses.asdict(vision)},
            "vocab_subset": list(tokenizer.vocab_subset or []),
        },
        loader=loader,
        boxed=flatten(
            jax.eval_shape(lambda: CLIPModel(clip).init(jax.random.key(0), *example))["params"]
        ),
        init_flat=init_flat,
        pretrained_flat=lambda fresh: {},
        step_fn=lambda tx: make_step(
            contrastive_losses(clip), tx, learning_rate(config.train), 0.0
        ),
        batch={
            "image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
            "ids": jax.ShapeDtypeStruct((batch, length), jnp.int32),
        },
    )


def image_encoder_from_clip_run(meta: dict, flat: dict) -> tuple[CLIPVisionConfig, dict]:
    """The image tower of a CLIP run's restored parameters, as `ImageEncoder` params."""
    config = CLIPVisionConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["clip"]["vision"].items()}
    )
    tower = {k: v for k, v in flat.items() if k.split("/")[0] in IMAGE_PARTS}
    return config, unflatten(tower)
