"""`sdjax export CHECKPOINT OUT_DIR`: a trained model in PyTorch's formats (or sdjax's).

`export(checkpoint, out, format)` reads a training checkpoint or pipeline folder (local or
`gs://`) and writes OUT_DIR whole or not at all: the folder is made under a temporary name
beside it (or staged locally for a bucket) and renamed (uploaded) when complete. Format
"sdjax" is a pipeline folder (model.json + params.safetensors); "diffusers" (the default)
puts, beside each other as in a diffusers pipeline folder:
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

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

from sdjax import paths
from sdjax.convert.clip import image_encoder_to_transformers, text_encoder_to_transformers
from sdjax.convert.files import file_mode_mask, write_json, write_safetensors
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


FORMATS = ("diffusers", "sdjax")


def export(checkpoint: str, out: str, format: str = "diffusers", use_ema: bool | None = None):
    """Write the model of `checkpoint` to the new or empty folder `out`: "diffusers"
    (`export_pipeline`) or "sdjax" (a pipeline folder `sdjax.load_pipeline` reads)."""
    from sdjax.pipeline import load_pipeline, save_pipeline

    if format not in FORMATS:
        raise UserError(f"export format {format!r}; known: {', '.join(FORMATS)}")
    if paths.exists(out) and not paths.isdir(out):
        raise UserError(f"output {out} is a file, not a folder")
    if paths.listdir(out):
        raise UserError(f"output folder {out} is not empty")
    pipeline = load_pipeline(checkpoint, use_ema=use_ema)
    write = save_pipeline if format == "sdjax" else export_pipeline
    with _staged(out) as staging:
        write(pipeline, staging)


@contextlib.contextmanager
def _staged(out: str):
    """A local folder to write into, which becomes `out` only when the writing succeeded."""
    if paths.is_remote(out):
        with paths.staging_dir("sdjax-export-") as staging:
            yield staging
            paths.upload_tree(staging, out)
        return
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", dir=parent)
    try:
        yield staging
        os.chmod(staging, 0o777 & ~file_mode_mask())
        os.replace(staging, out)  # an empty `out` is replaced as well
    finally:
        shutil.rmtree(staging, ignore_errors=True)
