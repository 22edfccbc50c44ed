"""User-supplied pretrained weights for training, checked against the model the config describes.

The config describes every part's architecture (so a run can be planned with no files);
weights come from `config.init`:

- `init.pretrained`: a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/,
  scheduler/, tokenizer/). The UNet gains the location channel (zero weights) and the
  adapters (zero gates); GroundingNet and the CLS MLP start fresh.
- `init.image_encoder`: an open_clip safetensors file, a transformers
  CLIPVisionModelWithProjection folder, or an sdjax pipeline folder or training run (e.g.
  the toy CLIP run: its image tower).

A file whose architecture differs from the config's is refused, naming the fields.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from sdjax.convert.unet import pad_input_channels
from sdjax.errors import UserError
from sdjax.models.clip import CLIPVisionConfig
from sdjax.subject_diffusion import ModelConfig, NoiseConfig
from sdjax.train.state import flatten, unflatten

# Fields a pretrained file does not decide: sdjax's settings (compute, adapters, probes)
# and diffusers' `sample_size`, a default that changes no weight and no computation.
UNET_OURS = ("adapter", "probe_layers", "remat", "dtype", "attention_implementation")
UNET_OURS += ("sample_size",)
CLIP_OURS = ("dtype", "remat", "attention_implementation")
VAE_OURS = ("dtype", "sample_size")


def pretrained_parts(init, model: ModelConfig) -> dict:
    """{part: float32 numpy params} of the files `init` names ({} when none)."""
    init = dict(init or {})
    root, source = init.get("pretrained"), init.get("image_encoder")
    parts = {}
    if root:
        parts = stable_diffusion_parts(root, model)
        if not source:
            raise UserError("init.image_encoder is required with init.pretrained")
    if source:
        image, parts["image_encoder"] = load_image_encoder(source)
        check_matches(f"init.image_encoder {source}", image, model.image, CLIP_OURS)
    return parts


def stable_diffusion_parts(root: str, model: ModelConfig) -> dict:
    """UNet, VAE and text encoder params of a diffusers folder that matches `model`."""
    from sdjax.convert.clip import text_encoder_from_transformers
    from sdjax.convert.files import read_json
    from sdjax.convert.unet import unet_from_diffusers
    from sdjax.convert.vae import vae_from_diffusers

    if not os.path.isdir(root):
        raise UserError(f"init.pretrained: not a folder: {root}")
    if model.vae is None:
        raise UserError("init.pretrained needs a latent model (model.vae is unset)")
    unet_cfg, unet = unet_from_diffusers(os.path.join(root, "unet"))
    unet_cfg = dataclasses.replace(unet_cfg, in_channels=unet_cfg.in_channels + 1)
    check_matches(f"{root}/unet", unet_cfg, model.unet, UNET_OURS)
    vae_cfg, vae = vae_from_diffusers(os.path.join(root, "vae"))
    check_matches(f"{root}/vae", vae_cfg, model.vae, VAE_OURS)
    text_cfg, text = text_encoder_from_transformers(os.path.join(root, "text_encoder"))
    check_matches(f"{root}/text_encoder", text_cfg, model.text, CLIP_OURS)
    scheduler = os.path.join(root, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler):
        names = {f.name for f in dataclasses.fields(NoiseConfig)}
        theirs = {k: v for k, v in read_json(scheduler).items() if k in names}
        check_matches(f"{root}/scheduler", NoiseConfig(**theirs), model.noise, ())
    return {"unet": unet, "vae": vae, "text_encoder": text}


def check_matches(what: str, theirs, ours, own_fields) -> None:
    """Refuse a file's config that differs from the model config's (dataclasses of one
    type) in any field but `own_fields` (sdjax's settings)."""
    differ = [
        f"{f.name} {getattr(theirs, f.name)!r} (config: {getattr(ours, f.name)!r})"
        for f in dataclasses.fields(ours)
        if f.name not in own_fields and getattr(theirs, f.name) != getattr(ours, f.name)
    ]
    if differ:
        raise UserError(f"{what} does not match the config's architecture: {'; '.join(differ)}")


def load_image_encoder(source: str) -> tuple[CLIPVisionConfig, dict]:
    """An image encoder from an open_clip .safetensors file, a transformers folder, a
    training run (a CLIP run's image tower, or a Subject-Diffusion run's image encoder) or
    an sdjax pipeline folder."""
    from sdjax.checkpoint import is_training_checkpoint, restore_params
    from sdjax.convert.clip import image_encoder_from_transformers
    from sdjax.convert.open_clip import image_encoder_from_open_clip

    if os.path.isfile(source):
        return image_encoder_from_open_clip(source)
    if is_training_checkpoint(source):  # before config.json: a workdir holds one too
        meta, flat = restore_params(source)
        if meta.get("task") == "clip":
            from sdjax.models.clip_model import image_tower

            return image_tower(meta, flat)
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
