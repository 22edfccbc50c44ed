"""`sdjax export CHECKPOINT OUT_DIR`: a trained model in PyTorch's formats.

OUT_DIR gets, beside each other as in a diffusers pipeline folder:
  unet/           diffusers UNet2DConditionModel (attention_type "gated", in_channels C+1)
  text_encoder/   transformers CLIPTextModel
  image_encoder/  transformers CLIPVisionModelWithProjection
  vae/            diffusers AutoencoderKL (latent models only)
  grounding/      GroundingNet: config.json + model.safetensors
  cls_mlp/        the CLS MLP: config.json + model.safetensors
  scheduler/      scheduler_config.json (DDIMScheduler)
  tokenizer/      vocab.json, merges.txt (+ vocab_subset.json for a reduced vocabulary)
  sdjax.json      the sdjax model config (also what `sdjax.torch_modules` reads)
`sdjax.torch_modules` runs GroundingNet and the CLS MLP and samples end to end in PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from sdjax.convert.clip import image_encoder_to_transformers, text_encoder_to_transformers
from sdjax.convert.files import write_json, write_safetensors
from sdjax.convert.keys import KeyTable, flax_to_torch
from sdjax.convert.unet import unet_to_diffusers
from sdjax.convert.vae import vae_to_diffusers
from sdjax.errors import UserError
from sdjax.pipeline import Pipeline
from sdjax.tokenizer import BUILTIN_VOCAB

EXTRA_KEYS = KeyTable(lists=frozenset())


def grounding_config(pipeline: Pipeline) -> dict:
    config = pipeline.config
    return {
        "patch_dim": config.image.hidden_size,
        "num_patches": config.image.num_patches,
        "hidden_dim": config.grounding_hidden,
        "out_dim": config.unet.objs_dim,
    }


def cls_mlp_config(pipeline: Pipeline) -> dict:
    config = pipeline.config
    return {"in_dim": config.image.projection_dim, "out_dim": config.text.hidden_size}


def scheduler_config(pipeline: Pipeline) -> dict:
    return {
        "_class_name": "DDIMScheduler",
        **dataclasses.asdict(pipeline.config.noise),
        "clip_sample": False,
    }


def export_pipeline(pipeline: Pipeline, out: str) -> None:
    """Write every part of `pipeline` under `out` (see the module docstring)."""
    config, params = pipeline.config, pipeline.params
    if config.ablated:
        raise UserError(
            f"export: an ablation model ({', '.join(config.ablated)} off) has no diffusers "
            "form; use --format sdjax"
        )
    os.makedirs(out, exist_ok=True)
    unet_to_diffusers(config.unet, params["unet"], os.path.join(out, "unet"))
    text_encoder_to_transformers(
        config.text, params["text_encoder"], os.path.join(out, "text_encoder")
    )
    image_encoder_to_transformers(
        config.image, params["image_encoder"], os.path.join(out, "image_encoder")
    )
    if config.vae is not None:
        vae_to_diffusers(config.vae, params["vae"], os.path.join(out, "vae"))
    for part, part_config in (("grounding", grounding_config), ("cls_mlp", cls_mlp_config)):
        folder = os.path.join(out, part)
        os.makedirs(folder, exist_ok=True)
        write_safetensors(
            os.path.join(folder, "model.safetensors"), flax_to_torch(params[part], EXTRA_KEYS)
        )
        write_json(os.path.join(folder, "config.json"), part_config(pipeline))
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    write_json(os.path.join(out, "scheduler", "scheduler_config.json"), scheduler_config(pipeline))
    tokenizer = os.path.join(out, "tokenizer")
    os.makedirs(tokenizer, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(pipeline.tokenizer.folder or BUILTIN_VOCAB, name), tokenizer)
    if config.vocab_subset is not None:
        write_json(os.path.join(tokenizer, "vocab_subset.json"), list(config.vocab_subset))
    with open(os.path.join(out, "sdjax.json"), "w") as f:
        json.dump({"model": config.to_dict()}, f, indent=2)
