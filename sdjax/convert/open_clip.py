"""open_clip's towers -> our encoders' params: the visual tower (a ViT, e.g. OpenCLIP
ViT-H-14) -> `ImageEncoder`, the text tower of a whole CLIP model -> `TextEncoder`.

The safetensors file holds a whole open_clip CLIP model (the visual tower under
`visual.`, the text tower at the top level; each reader skips the other tower's keys by
their known names) or, for the image encoder, the visual tower alone. Explicit tables
rename every key to transformers' `CLIPVisionModelWithProjection` / `CLIPTextModel` name;
the fused attention `in_proj` `[3D, D]` is split into q/k/v, and the visual `proj`
(`[D, out]`, applied as `x @ proj`) becomes `visual_projection.weight` (`[out, D]`). The
shapes give the config; heads cannot be read from weights (see `default_heads`).
"""

from __future__ import annotations

import math
import re

import numpy as np

from sdjax.convert.clip import TEXT_KEYS, abstract_text_params, image_params_from_state
from sdjax.convert.files import CheckpointError, read_safetensors
from sdjax.convert.keys import torch_to_flax
from sdjax.errors import UserError
from sdjax.models.clip import CLIPTextConfig, CLIPVisionConfig
from sdjax.models.clip_text import LEGACY_EOS_TOKEN_ID

_VISUAL = "visual."
# A whole CLIP model's text tower (open_clip `CLIP`, or `CustomTextCLIP`'s `text.`).
_TEXT_TOWER_PREFIXES = ("token_embedding.", "transformer.", "ln_final.", "text.")
_TEXT_TOWER_NAMES = frozenset(
    {"positional_embedding", "text_projection", "logit_scale", "logit_bias", "attn_mask"}
)

# Copied as they are: open_clip key -> transformers key.
_TOP = {
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "class_embedding": "vision_model.embeddings.class_embedding",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
_BLOCK = {  # inside `transformer.resblocks.N.` -> inside `{vision,text}_model.encoder.layers.N.`
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_FUSED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}  # -> q/k/v_proj.<leaf>
_PROJ = "proj"
_BLOCK_INDEX = re.compile(r"transformer\.resblocks\.(\d+)\.")

# The text tower of a whole CLIP model: open_clip key -> transformers `CLIPTextModel` key.
_TEXT_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# Top-level keys that are not the text encoder's: the CLIP model's head (its reader's job,
# see `sdjax.eval.metric_models`) and the causal-mask buffer old open_clip files saved.
_NOT_TEXT_ENCODER = frozenset({"text_projection", "logit_scale", "attn_mask"})

# Widths of open_clip's published ViT configs whose head width is not 64 (ViT-H-14: 80,
# ViT-g-14: 88, ViT-bigG-14: 104, ViT-e-14: 112); all of them have 16 heads.
_HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16, 1792: 16}


def default_heads(width: int) -> int:
    """Heads of open_clip's published ViT of this width: width // 64, except the big ones."""
    return _HEADS_BY_WIDTH.get(width, width // 64)


def image_encoder_from_open_clip(
    path: str, *, heads: int | None = None, act: str = "gelu"
) -> tuple[CLIPVisionConfig, dict]:
    """An open_clip safetensors file -> (config, float32 numpy params of `ImageEncoder`).

    heads: attention heads (default `default_heads(width)`); act: "gelu" (OpenCLIP) or
    "quick_gelu" (OpenAI-trained and `-quickgelu` models).
    """
    tower, prefix = _visual_tower(read_safetensors(path), path)
    layers = _num_layers(tower)
    _check_keys(tower, [*_TOP, *_block_keys(layers), _PROJ], prefix, path)
    config = _config(tower, layers, heads, act, prefix, path)
    state = _transformers_state(tower, layers, config.hidden_size, prefix, path)
    return config, image_params_from_state(config, state, what=path)


def text_encoder_from_open_clip(
    path: str, *, heads: int | None = None, act: str = "gelu"
) -> tuple[CLIPTextConfig, dict]:
    """A whole open_clip CLIP model's safetensors file -> (config, params of `TextEncoder`).

    heads: attention heads (default width // 64, true of every published open_clip text
    tower); act: as for `image_encoder_from_open_clip`. open_clip pools at the largest
    token id (`text.argmax`, EOT in CLIP's vocabulary), which the config says with
    transformers' legacy `eos_token_id`. Attention is causal, as open_clip's `attn_mask`.
    """
    state = read_safetensors(path)
    tower = {
        k: v for k, v in state.items() if not k.startswith(_VISUAL) and k not in _NOT_TEXT_ENCODER
    }
    layers = _num_layers(tower)
    _check_keys(tower, [*_TEXT_TOP, *_block_keys(layers)], "", path)
    for key in ("token_embedding.weight", "positional_embedding"):
        if tower[key].ndim != 2:
            raise CheckpointError(f"{path}: key {key!r} has shape {tower[key].shape}")
    vocab, width = tower["token_embedding.weight"].shape
    try:
        config = CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=tower["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=layers,
            num_attention_heads=heads or width // 64,
            max_position_embeddings=tower["positional_embedding"].shape[0],
            hidden_act=act,
            eos_token_id=LEGACY_EOS_TOKEN_ID,
        )
    except UserError as err:
        raise CheckpointError(f"{path}: {err}") from None
    hf = {theirs: tower[ours] for ours, theirs in _TEXT_TOP.items()}
    hf.update(_blocks_state(tower, layers, width, "text_model.", "", path))
    return config, torch_to_flax(hf, abstract_text_params(config), TEXT_KEYS, what=path)


def _visual_tower(state: dict, path: str) -> tuple[dict, str]:
    """The visual tower's tensors without their `visual.` prefix, and that prefix."""
    if not any(k.startswith(_VISUAL) for k in state):
        return state, ""
    tower = {}
    for key, value in state.items():
        if key.startswith(_VISUAL):
            tower[key[len(_VISUAL) :]] = value
        elif not (key in _TEXT_TOWER_NAMES or key.startswith(_TEXT_TOWER_PREFIXES)):
            raise CheckpointError(f"{path}: unexpected key {key!r} (not open_clip's CLIP)")
    return tower, _VISUAL


def _num_layers(tower: dict) -> int:
    found = [int(m.group(1)) for k in tower if (m := _BLOCK_INDEX.match(k))]
    return max(found) + 1 if found else 1  # no block at all: block 0 is reported missing


def _block_keys(layers: int) -> list[str]:
    per_block = [*_BLOCK, *_FUSED]
    return [f"transformer.resblocks.{i}.{k}" for i in range(layers) for k in per_block]


def _check_keys(tower: dict, expected: list[str], prefix: str, path: str) -> None:
    for problem, keys in (
        ("missing", [k for k in expected if k not in tower]),
        ("unexpected", sorted(set(tower) - set(expected))),
    ):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise CheckpointError(f"{path}: {problem} key {prefix + keys[0]!r}{more}")


def _config(tower: dict, layers: int, heads: int | None, act: str, prefix: str, path: str):
    for key, ndim in (("conv1.weight", 4), ("positional_embedding", 2), (_PROJ, 2)):
        if tower[key].ndim != ndim:
            raise CheckpointError(f"{path}: key {prefix + key!r} has shape {tower[key].shape}")
    width, channels, patch, _ = tower["conv1.weight"].shape
    grid = math.isqrt(tower["positional_embedding"].shape[0] - 1)
    if grid * grid + 1 != tower["positional_embedding"].shape[0]:
        raise CheckpointError(f"{path}: positional_embedding is not a square grid plus CLS")
    try:
        return CLIPVisionConfig(
            hidden_size=width,
            intermediate_size=tower["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            projection_dim=tower[_PROJ].shape[-1],
            num_hidden_layers=layers,
            num_attention_heads=heads or default_heads(width),
            num_channels=channels,
            image_size=grid * patch,
            patch_size=patch,
            hidden_act=act,
        )
    except UserError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _transformers_state(tower: dict, layers: int, width: int, prefix: str, path: str) -> dict:
    state = {theirs: tower[ours] for ours, theirs in _TOP.items()}
    state.update(_blocks_state(tower, layers, width, "vision_model.", prefix, path))
    state["visual_projection.weight"] = np.asarray(tower[_PROJ]).T
    return state


def _blocks_state(tower: dict, layers: int, width: int, model: str, prefix: str, path: str):
    """`transformer.resblocks.N.*` -> transformers' `{model}encoder.layers.N.*`, q/k/v split."""
    state = {}
    for i in range(layers):
        block, layer = f"transformer.resblocks.{i}.", f"{model}encoder.layers.{i}."
        state.update({layer + theirs: tower[block + ours] for ours, theirs in _BLOCK.items()})
        for fused, leaf in _FUSED.items():
            tensor = tower[block + fused]
            if tensor.shape[0] != 3 * width:
                raise CheckpointError(
                    f"{path}: key {prefix + block + fused!r} has shape {tuple(tensor.shape)}, "
                    f"expected {3 * width} rows (q, k, v)"
                )
            for name, part in zip("qkv", np.split(tensor, 3, axis=0)):
                state[f"{layer}self_attn.{name}_proj.{leaf}"] = part
    return state
