"""diffusers `AutoencoderKL` folders (config.json + safetensors) <-> (`VAEConfig`, params).

Loading is strict: every key the model needs must be present with its shape, and no
other key may be. The model's shapes come from `jax.eval_shape`, so no real VAE is ever
initialised just to be overwritten.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from sdjax.convert.files import read_json, read_weights, write_json, write_safetensors
from sdjax.convert.keys import KeyTable, flax_to_torch, torch_to_flax
from sdjax.models.vae import AutoencoderKL, VAEConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG = "config.json"

VAE_KEYS = KeyTable(
    lists=frozenset(
        {
            "down_blocks",
            "up_blocks",
            "resnets",
            "attentions",
            "downsamplers",
            "upsamplers",
            "to_out",
        }
    )
)


def abstract_vae_params(config: VAEConfig):
    """The VAE's parameter tree as ShapeDtypeStructs boxed with their logical axis names
    (nothing is computed or allocated)."""
    side = config.downscale
    images = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
    variables = jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), images)
    return variables["params"]


def vae_from_diffusers(folder: str) -> tuple[VAEConfig, dict]:
    """A diffusers AutoencoderKL folder -> (config, float32 numpy params)."""
    state = read_weights(folder, WEIGHTS)
    config = VAEConfig.from_diffusers(read_json(os.path.join(folder, CONFIG)))
    params = torch_to_flax(state, abstract_vae_params(config), VAE_KEYS, what=folder)
    return config, params


def vae_to_diffusers(config: VAEConfig, params, folder: str) -> None:
    """Write a folder `diffusers.AutoencoderKL.from_pretrained` loads (float32 weights)."""
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, WEIGHTS), flax_to_torch(params, VAE_KEYS))
    write_json(os.path.join(folder, CONFIG), config.to_diffusers())
