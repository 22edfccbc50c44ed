"""The networks behind DreamBench's scores (docs/method.md §7), loaded from user-supplied
checkpoints.

- DINO (the "DINO" image similarity): `sdjax.models.vit.ViT` (ViT-S/16 in the protocol)
  from a transformers `ViTModel` folder or a timm / official DINO safetensors file
  (`load_dino`, readers in `sdjax.convert.vit`).
- CLIP (CLIP-I and CLIP-T): `sdjax.models.clip_model.CLIPModel`, the image and text
  towers with their projections (ViT-B/32 is the common choice, ViT-L/14 is reported too), from a
  transformers `CLIPModel` folder or a whole open_clip CLIP model saved as safetensors
  (`load_clip`). Images `[B, S, S, 3]` normalised with the vision config's mean/std ->
  image embeddings `[B, E]`; token ids `[B, L]` -> text embeddings `[B, E]` (projected,
  not normalised), exactly as transformers' `get_image_features` / `get_text_features`
  and open_clip's `encode_image` / `encode_text`.

Loaders return (config, float32 numpy params). No weights ship with sdjax.
"""

from __future__ import annotations

import os

import numpy as np

from sdjax.convert.clip import read_config, without_position_ids
from sdjax.convert.files import CheckpointError, read_safetensors, read_weights
from sdjax.convert.keys import KeyTable, torch_to_flax
from sdjax.convert.open_clip import image_encoder_from_open_clip, text_encoder_from_open_clip
from sdjax.convert.vit import vit_from_timm, vit_from_transformers
from sdjax.errors import UserError
from sdjax.models.clip_model import CLIPConfig, abstract_clip_params
from sdjax.models.vit import ViTConfig

WEIGHTS = "model.safetensors"
# Our CLIPModel's parameter paths are transformers' CLIPModel keys.
CLIP_KEYS = KeyTable(lists=frozenset({"layers"}))


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
