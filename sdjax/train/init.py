"""A model to train, from a training config: its `ModelConfig`, tokenizer and parameters.

Two starting points:
- from scratch (the toy model): `config.model` gives every part's shape; the text
  vocabulary may be the toy world's words only (`config.model.vocab = "toy"`);
- from user-supplied pretrained weights (SD 1.x / 2.x): `config.init.pretrained` is a
  diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/), and
  `config.init.image_encoder` an open_clip safetensors file or a transformers
  CLIPVisionModelWithProjection folder. `config.model` then holds only sdjax's settings
  (adapters, probed layers, remat, dtype). The UNet gains the location channel (zero
  weights) and adapters (zero gates); GroundingNet and the CLS MLP start fresh.
- `config.init.image_encoder` may also name an sdjax pipeline folder or training workdir
  (e.g. the toy CLIP): its `image_encoder` part is used.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from sdjax.convert.unet import pad_input_channels
from sdjax.errors import UserError
from sdjax.model import ModelConfig, NoiseConfig
from sdjax.models.clip import CLIPVisionConfig
from sdjax.tokenizer import Tokenizer
from sdjax.train.state import flatten, unflatten


def _section(config, name: str) -> dict:
    value = config.get(name)
    return {} if value is None else dict(value)


def toy_vocabulary() -> list[str]:
    from sdjax.data.toy import BACKGROUNDS, ToyWorld

    world = ToyWorld()
    words = {"a", "an", "and", "on", "background", *BACKGROUNDS}
    for vocab in (world.shapes, world.colours, world.patterns):
        words.update(w for item in vocab for w in item.split())
    return sorted(words)


def text_with_vocabulary(text: dict, vocab: str | None) -> tuple[dict, Tokenizer]:
    """A text-tower config dict and its tokenizer; vocab "toy" restricts the vocabulary to
    the toy world's words (a small embedding table), None keeps CLIP's."""
    if vocab is None:
        return text, Tokenizer(max_length=text["max_position_embeddings"])
    if vocab != "toy":
        raise UserError(f"model.vocab must be 'toy' or unset, got {vocab!r}")
    tokenizer = Tokenizer.for_vocabulary(toy_vocabulary(), text["max_position_embeddings"])
    subset = tokenizer.vocab_subset
    text = {
        **text,
        "vocab_size": tokenizer.vocab_size,
        "bos_token_id": subset.index(49406),
        "eos_token_id": subset.index(49407),
        "pad_token_id": subset.index(49407),
    }
    return text, tokenizer


def model_from_scratch(config) -> tuple[ModelConfig, Tokenizer]:
    m = config.model.to_dict()
    text, tokenizer = text_with_vocabulary(dict(m.pop("text")), m.pop("vocab", None))
    if tokenizer.vocab_subset is not None:
        m["vocab_subset"] = list(tokenizer.vocab_subset)
    return ModelConfig.from_dict({**m, "text": text}), tokenizer


def model_from_pretrained(config) -> tuple[ModelConfig, Tokenizer, dict]:
    """(ModelConfig, tokenizer, pretrained params by part) from `config.init` folders."""
    from sdjax.convert.clip import text_encoder_from_transformers
    from sdjax.convert.unet import unet_from_diffusers
    from sdjax.convert.vae import vae_from_diffusers

    root = config.init.pretrained
    if not os.path.isdir(root):
        raise UserError(f"init.pretrained: not a folder: {root}")
    ours = _section(config, "model")
    unet_cfg, unet = unet_from_diffusers(os.path.join(root, "unet"))
    vae_cfg, vae = vae_from_diffusers(os.path.join(root, "vae"))
    text_cfg, text = text_encoder_from_transformers(os.path.join(root, "text_encoder"))
    image_cfg, image = load_image_encoder(config.init.image_encoder)
    unet_cfg = dataclasses.replace(
        unet_cfg, in_channels=unet_cfg.in_channels + 1, adapter=True, **ours.pop("unet", {})
    )
    text_cfg = dataclasses.replace(text_cfg, **ours.pop("text", {}))
    image_cfg = dataclasses.replace(image_cfg, **ours.pop("image", {}))
    scheduler = os.path.join(root, "scheduler", "scheduler_config.json")
    noise = NoiseConfig(**_noise_fields(scheduler)) if os.path.isfile(scheduler) else NoiseConfig()
    model = ModelConfig(
        unet=unet_cfg,
        text=text_cfg,
        image=image_cfg,
        vae=dataclasses.replace(vae_cfg, **ours.pop("vae", {})),
        noise=noise,
        **{k: v for k, v in ours.items() if k != "vocab"},
    )
    tokenizer = Tokenizer(
        folder=os.path.join(root, "tokenizer"), max_length=text_cfg.max_position_embeddings
    )
    params = {"unet": unet, "vae": vae, "text_encoder": text, "image_encoder": image}
    return model, tokenizer, params


def _noise_fields(path: str) -> dict:
    from sdjax.convert.files import read_json

    d = read_json(path)
    names = {f.name for f in dataclasses.fields(NoiseConfig)}
    return {k: v for k, v in d.items() if k in names}


def load_image_encoder(source: str | None) -> tuple[CLIPVisionConfig, dict]:
    """An image encoder from an open_clip .safetensors file, a transformers folder, a
    training run (a CLIP run's image tower, or a Subject-Diffusion run's image encoder) or
    an sdjax pipeline folder."""
    from sdjax.checkpoint import is_training_checkpoint, restore_params
    from sdjax.convert.clip import image_encoder_from_transformers
    from sdjax.convert.open_clip import image_encoder_from_open_clip

    if not source:
        raise UserError("init.image_encoder is required with init.pretrained")
    if os.path.isfile(source):
        return image_encoder_from_open_clip(source)
    if is_training_checkpoint(source):  # before config.json: a workdir holds one too
        meta, flat = restore_params(source)
        if meta.get("task") == "clip":
            from sdjax.train.clip_task import image_encoder_from_clip_run

            return image_encoder_from_clip_run(meta, flat)
    elif os.path.isfile(os.path.join(source, "config.json")):
        return image_encoder_from_transformers(source)
    from sdjax.pipeline import load_pipeline

    pipe = load_pipeline(source)
    params = {k: np.asarray(v) for k, v in flatten(pipe.params["image_encoder"]).items()}
    return pipe.config.image, unflatten(params)


def overlay_pretrained(fresh_flat: dict, pretrained: dict) -> dict:
    """Fresh flat params ('part/path') with every pretrained leaf copied in; the UNet's
    conv_in keeps its pretrained input channels and gets zeros for the location channel.
    Returns {name: numpy array} of the replaced leaves only."""
    replaced = {}
    for part, tree in pretrained.items():
        for key, value in flatten(tree).items():
            name = f"{part}/{key}"
            if name not in fresh_flat:
                raise UserError(f"pretrained {part} has a parameter the model lacks: {key}")
            value = np.asarray(value, np.float32)
            if name == "unet/conv_in/kernel":
                value = pad_input_channels(value, fresh_flat[name].shape[2])
            if value.shape != tuple(fresh_flat[name].shape):
                raise UserError(
                    f"pretrained {name} has shape {value.shape}, "
                    f"model needs {tuple(fresh_flat[name].shape)}"
                )
            replaced[name] = value
    return replaced
