"""Stable Diffusion UNets in and out of diffusers' `UNet2DConditionModel` folders.

Reading is strict (every key, shape and dtype checked). `extend_unet` turns a plain SD
UNet into Subject-Diffusion's: a zero-initialised location input channel and fresh
adapters with zero gates, so the extended UNet computes exactly what the original did.
Export writes `attention_type="gated"` and `in_channels=5`: diffusers' GLIGEN `fuser`
names are the adapter's names. diffusers' gated UNet also owns a `position_net` (GLIGEN's
text-box projection), which Subject-Diffusion replaces with GroundingNet: it is written
as zeros so `from_pretrained` loads, and `sdjax.torch_modules.attach_grounding` swaps it.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import traverse_util

from sdjax import __version__
from sdjax.convert.files import read_json, read_weights, write_json, write_safetensors
from sdjax.convert.keys import KeyTable, flax_to_torch, torch_to_flax
from sdjax.errors import UserError
from sdjax.models.layers import unbox
from sdjax.models.unet import init_unet
from sdjax.models.unet_config import UNetConfig

UNET_KEYS = KeyTable(
    lists=frozenset(
        {
            "down_blocks",
            "up_blocks",
            "resnets",
            "attentions",
            "transformer_blocks",
            "downsamplers",
            "upsamplers",
            "to_out",
            "net",
        }
    )
)
WEIGHTS = "diffusion_pytorch_model.safetensors"
GLIGEN_POSITION_NET = "position_net."


def unet_folder(path: str) -> str:
    """A UNet folder, or the `unet/` folder of a diffusers pipeline folder."""
    sub = os.path.join(path, "unet")
    return sub if os.path.isfile(os.path.join(sub, "config.json")) else path


def abstract_unet(config: UNetConfig):
    """Parameter shapes of a UNet, computed without allocating them."""
    return jax.eval_shape(lambda: init_unet(config, jax.random.key(0)))


def unet_from_diffusers(path: str) -> tuple[UNetConfig, dict]:
    """(config, float32 numpy params) of a diffusers UNet folder (config.json + safetensors)."""
    folder = unet_folder(path)
    config = UNetConfig.from_diffusers(read_json(os.path.join(folder, "config.json")))
    state = {
        k: v
        for k, v in read_weights(folder, WEIGHTS).items()
        if not k.startswith(GLIGEN_POSITION_NET)
    }
    params = torch_to_flax(state, abstract_unet(config), UNET_KEYS, what=f"UNet {folder}")
    return config, params


def unet_to_diffusers(config: UNetConfig, params, folder: str) -> None:
    """Write a folder that `UNet2DConditionModel.from_pretrained` loads."""
    os.makedirs(folder, exist_ok=True)
    state = flax_to_torch(params, UNET_KEYS)
    if config.adapter:
        state.update(_zero_position_net(config))
    write_safetensors(os.path.join(folder, WEIGHTS), state)
    write_json(
        os.path.join(folder, "config.json"),
        {**config.to_diffusers(), "_diffusers_version": "0.39.0", "_sdjax_version": __version__},
    )


def extend_unet(config: UNetConfig, params, *, in_channels: int, adapter: bool, rng):
    """Add location channels (zero weights) and fresh adapters (zero gates) to a UNet.

    Returns (new config, new params); the new UNet's output equals the old one's when the
    extra input channels are zero, whatever the adapters' objs.
    """
    new_config = dataclasses.replace(config, in_channels=in_channels, adapter=adapter)
    flat = traverse_util.flatten_dict(params)
    fresh = traverse_util.flatten_dict(jax.device_get(_unboxed_init(new_config, rng)))
    for path, value in fresh.items():
        if "fuser" in path and path not in flat:
            flat[path] = np.asarray(value)
    flat[("conv_in", "kernel")] = pad_input_channels(flat[("conv_in", "kernel")], in_channels)
    return new_config, traverse_util.unflatten_dict(flat)


def pad_input_channels(kernel, channels: int) -> np.ndarray:
    """A conv kernel `[kh, kw, C_in, C_out]` with zero weights for new input channels."""
    kernel = np.asarray(kernel)
    extra = channels - kernel.shape[2]
    if extra < 0:
        raise UserError(f"cannot shrink a conv from {kernel.shape[2]} to {channels} inputs")
    return np.pad(kernel, ((0, 0), (0, 0), (0, extra), (0, 0)))


def _unboxed_init(config: UNetConfig, rng):
    return unbox(jax.jit(init_unet, static_argnums=0)(config, rng))


def _zero_position_net(config: UNetConfig) -> dict[str, np.ndarray]:
    """diffusers' GLIGEN text-only position_net, all zeros (unused: see module docstring)."""
    width, box = config.cross_attention_dim, 64
    shapes = {
        "linears.0.weight": (512, width + box),
        "linears.0.bias": (512,),
        "linears.2.weight": (512, 512),
        "linears.2.bias": (512,),
        "linears.4.weight": (config.cross_attention_dim, 512),
        "linears.4.bias": (config.cross_attention_dim,),
        "null_positive_feature": (width,),
        "null_position_feature": (box,),
    }
    return {GLIGEN_POSITION_NET + k: np.zeros(s, np.float32) for k, s in shapes.items()}
