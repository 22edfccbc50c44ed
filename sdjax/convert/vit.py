"""DINO ViT checkpoints -> (ViTConfig, float32 params of `sdjax.models.vit.ViT`).

Two layouts are read:
  - a transformers `ViTModel` folder (config.json + model.safetensors), e.g.
    facebook/dino-vits16. `ViTModel` saves a pooler by default, DINO's checkpoints have
    none and DINO similarity does not use it: `pooler.dense.*` keys are ignored, by name.
  - a timm / official DINO state dict saved as safetensors (`cls_token`, `pos_embed`,
    `patch_embed.proj`, `blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
    mlp.fc2}`, `norm`). Its config comes from the shapes; heads cannot be read from
    weights (default width // 64: ViT-S/16, 384 wide, has 6); LayerNorm eps is DINO's
    1e-6. The packed `attn.qkv` `[3D, D]` holds q, k, v rows in that order. Official DINO
    `.pth` files are pickles: save their state dict as safetensors first.
Both are renamed onto our parameter names (see `sdjax.models.vit`) by explicit tables and
loaded strictly: a missing or unknown key is an error naming the file's key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.convert.clip import read_config
from sdjax.convert.files import CheckpointError, read_safetensors, read_weights
from sdjax.convert.keys import KeyTable, torch_to_flax
from sdjax.errors import UserError
from sdjax.models.vit import ViT, ViTConfig

WEIGHTS = "model.safetensors"
VIT_KEYS = KeyTable(lists=frozenset({"layers"}))  # our params <-> our PyTorch-style keys

_LEAVES = ("weight", "bias")
_OURS_TOP = (
    "embeddings.cls_token",
    "embeddings.position_embeddings",
    "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embeddings.projection.bias",
    "layernorm.weight",
    "layernorm.bias",
)
_OURS_LAYER = "encoder.layers.{}."

# transformers ViTModel: the top keys are ours; `encoder.layer.N.<module>` -> our layer's.
_HF_LAYER_PREFIX = "encoder.layer.{}."
_HF_LAYER = {
    "layernorm_before": "layer_norm1",
    "attention.attention.query": "self_attn.q_proj",
    "attention.attention.key": "self_attn.k_proj",
    "attention.attention.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "layernorm_after": "layer_norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_POOLER = frozenset({"pooler.dense.weight", "pooler.dense.bias"})

# timm / official DINO.
_TIMM_TOP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_TIMM_LAYER_PREFIX = "blocks.{}."
_TIMM_LAYER = {
    "norm1": "layer_norm1",
    "attn.proj": "self_attn.out_proj",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TIMM_QKV = "attn.qkv"  # packed q, k, v -> self_attn.{q,k,v}_proj
_TIMM_BLOCK = re.compile(r"blocks\.(\d+)\.")
_TIMM_LAYER_NORM_EPS = 1e-6  # DINO's and timm's ViT: partial(nn.LayerNorm, eps=1e-6)
_HEAD_WIDTH = 64  # every DINO ViT (S, B) has 64-wide heads


def abstract_vit_params(config: ViTConfig):
    """The ViT's parameter tree as ShapeDtypeStructs (nothing is allocated)."""
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    return jax.eval_shape(ViT(config).init, jax.random.key(0), images)["params"]


def vit_from_transformers(folder: str) -> tuple[ViTConfig, dict]:
    """A transformers `ViTModel` folder -> (config, float32 numpy params of `ViT`)."""
    config = read_config(folder, ViTConfig)
    table = {key: key for key in _OURS_TOP}
    table.update(_layer_table(config.num_hidden_layers, _HF_LAYER_PREFIX, _HF_LAYER))
    state = read_weights(folder, WEIGHTS)
    _check_keys(state, table, what=folder, ignored=_HF_POOLER)
    ours = {key: state[theirs] for theirs, key in table.items()}
    return config, torch_to_flax(ours, abstract_vit_params(config), VIT_KEYS, what=folder)


def vit_from_timm(path: str, *, heads: int | None = None) -> tuple[ViTConfig, dict]:
    """A timm / official DINO ViT safetensors file -> (config, float32 numpy params of `ViT`).

    heads: attention heads (default width // 64).
    """
    state = read_safetensors(path)
    found = [int(m.group(1)) for key in state if (m := _TIMM_BLOCK.match(key))]
    layers = max(found) + 1 if found else 1  # no block at all: block 0 is reported missing
    table = {**_TIMM_TOP, **_layer_table(layers, _TIMM_LAYER_PREFIX, _TIMM_LAYER)}
    packed = [_qkv_key(i, leaf) for i in range(layers) for leaf in _LEAVES]
    _check_keys(state, [*table, *packed], what=path)
    config = _timm_config(state, layers, heads, path)
    ours = {key: state[theirs] for theirs, key in table.items()}
    for i in range(layers):
        for leaf in _LEAVES:
            ours.update(_split_qkv(state, i, leaf, config.hidden_size, path))
    return config, torch_to_flax(ours, abstract_vit_params(config), VIT_KEYS, what=path)


def _layer_table(layers: int, prefix: str, modules: Mapping[str, str]) -> dict[str, str]:
    """{checkpoint key: our key} for every weight and bias of `layers` encoder layers."""
    return {
        f"{prefix.format(i)}{theirs}.{leaf}": f"{_OURS_LAYER.format(i)}{ours}.{leaf}"
        for i in range(layers)
        for theirs, ours in modules.items()
        for leaf in _LEAVES
    }


def _check_keys(state: Mapping, expected: Iterable[str], *, what: str, ignored=frozenset()):
    expected = set(expected)
    for problem, keys in (
        ("missing", sorted(expected - set(state))),
        ("unexpected", sorted(set(state) - expected - ignored)),
    ):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise CheckpointError(f"{what}: {problem} key {keys[0]!r}{more}")


def _timm_config(state: Mapping, layers: int, heads: int | None, path: str) -> ViTConfig:
    for key, ndim in (("patch_embed.proj.weight", 4), ("pos_embed", 3)):
        if state[key].ndim != ndim:
            raise CheckpointError(f"{path}: key {key!r} has shape {tuple(state[key].shape)}")
    width, channels, patch, _ = state["patch_embed.proj.weight"].shape
    tokens = state["pos_embed"].shape[1]
    grid = math.isqrt(tokens - 1)
    if grid * grid + 1 != tokens:
        raise CheckpointError(f"{path}: pos_embed is not a square grid plus CLS")
    try:
        return ViTConfig(
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads or width // _HEAD_WIDTH,
            intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
            layer_norm_eps=_TIMM_LAYER_NORM_EPS,
            image_size=grid * patch,
            patch_size=patch,
            num_channels=channels,
        )
    except UserError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _split_qkv(state: Mapping, layer: int, leaf: str, width: int, path: str) -> dict:
    key = _qkv_key(layer, leaf)
    packed = state[key]
    if packed.shape[0] != 3 * width:
        raise CheckpointError(
            f"{path}: key {key!r} has shape {tuple(packed.shape)}, "
            f"expected {3 * width} rows (q, k, v)"
        )
    ours = _OURS_LAYER.format(layer) + "self_attn.{}_proj." + leaf
    return {ours.format(name): part for name, part in zip("qkv", np.split(packed, 3, axis=0))}


def _qkv_key(layer: int, leaf: str) -> str:
    return f"{_TIMM_LAYER_PREFIX.format(layer)}{_TIMM_QKV}.{leaf}"
