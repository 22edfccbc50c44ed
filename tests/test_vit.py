"""DINO's ViT against transformers' PyTorch `ViTModel` (the form of facebook/dino-vits16).

A tiny random ViT (32 px images, patch 8, width 128, 2 heads, 2 layers, eps 1e-6) is
saved by transformers and loaded through `vit_from_transformers`; the CLS feature and all
tokens after the final LayerNorm must match to 1e-4 relative. The same weights, rewritten
here into timm / official DINO keys (packed qkv) by a mapping independent of the reader's
tables, must load through `vit_from_timm` into identical parameters.
"""

import functools
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from parity import assert_parity, nchw, randomise_
from safetensors.torch import load_file, save_file

from sdjax.convert.files import CheckpointError, read_json, write_json
from sdjax.convert.keys import to_torch_layout
from sdjax.convert.vit import abstract_vit_params, vit_from_timm, vit_from_transformers
from sdjax.models.vit import IMAGENET_MEAN, ViT, ViTConfig

TINY = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=256,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-6,
)
# facebook/dino-vits16's config.json (the fields that matter).
DINO_VITS16 = dict(
    model_type="vit",
    architectures=["ViTModel"],
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    image_size=224,
    patch_size=16,
    num_channels=3,
    qkv_bias=True,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
SAFETENSORS = "model.safetensors"


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(transformers ViTModel without pooler, random weights; its saved folder)."""
    ref = transformers.ViTModel(transformers.ViTConfig(**TINY), add_pooling_layer=False)
    ref = randomise_(ref).eval()
    folder = str(tmp_path_factory.mktemp("dino"))
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


@pytest.fixture(scope="module")
def loaded(reference):
    return vit_from_transformers(reference[1])


@functools.cache
def _jitted(config):
    return jax.jit(lambda params, x: ViT(config).apply({"params": params}, x))


def _reference_outputs(ref, images):
    with torch.no_grad():
        out = ref(pixel_values=nchw(images))
    assert out.pooler_output is None
    return out.last_hidden_state.numpy()


def test_matches_transformers(reference, loaded, images):
    config, params = loaded
    assert (config.hidden_size, config.num_attention_heads, config.layer_norm_eps) == (128, 2, 1e-6)
    assert config.mean == IMAGENET_MEAN
    tokens, cls = _jitted(config)(params, images)
    ref_tokens = _reference_outputs(reference[0], images)
    assert tokens.shape == (2, 17, 128) and cls.shape == (2, 128)
    assert_parity(cls, ref_tokens[:, 0])
    assert_parity(tokens, ref_tokens)


def _flat(params):
    return traverse_util.flatten_dict(nn.meta.unbox(params))


def _assert_same_params(a, b):
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


def test_pooler_keys_are_ignored(reference, loaded, tmp_path):
    """ViTModel saves a pooler by default; DINO does not use it, so it is skipped."""
    folder = str(tmp_path)
    shutil.copy(os.path.join(reference[1], "config.json"), folder)
    state = load_file(os.path.join(reference[1], SAFETENSORS))
    state.update(
        {"pooler.dense.weight": torch.ones(128, 128), "pooler.dense.bias": torch.ones(128)}
    )
    save_file(state, os.path.join(folder, SAFETENSORS))
    config, params = vit_from_transformers(folder)
    assert config == loaded[0]
    _assert_same_params(params, loaded[1])


def _timm_state(hf_state: dict, layers: int) -> dict:
    """transformers ViTModel keys -> timm / official DINO keys, q/k/v packed into qkv."""
    out = {
        "cls_token": hf_state["embeddings.cls_token"],
        "pos_embed": hf_state["embeddings.position_embeddings"],
        "norm.weight": hf_state["layernorm.weight"],
        "norm.bias": hf_state["layernorm.bias"],
    }
    for leaf in ("weight", "bias"):
        out[f"patch_embed.proj.{leaf}"] = hf_state[f"embeddings.patch_embeddings.projection.{leaf}"]
        for i in range(layers):
            hf, timm = f"encoder.layer.{i}.", f"blocks.{i}."
            attention = hf + "attention.attention."
            out[f"{timm}attn.qkv.{leaf}"] = torch.cat(
                [hf_state[f"{attention}{name}.{leaf}"] for name in ("query", "key", "value")]
            )
            out[f"{timm}attn.proj.{leaf}"] = hf_state[f"{hf}attention.output.dense.{leaf}"]
            out[f"{timm}norm1.{leaf}"] = hf_state[f"{hf}layernorm_before.{leaf}"]
            out[f"{timm}norm2.{leaf}"] = hf_state[f"{hf}layernorm_after.{leaf}"]
            out[f"{timm}mlp.fc1.{leaf}"] = hf_state[f"{hf}intermediate.dense.{leaf}"]
            out[f"{timm}mlp.fc2.{leaf}"] = hf_state[f"{hf}output.dense.{leaf}"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def timm_state(reference):
    return _timm_state(reference[0].state_dict(), TINY["num_hidden_layers"])


def test_timm_layout_loads_the_same_model(reference, loaded, timm_state, images, tmp_path):
    path = str(tmp_path / "dino_timm.safetensors")
    save_file(timm_state, path)
    config, params = vit_from_timm(path)  # heads default: width 128 // 64 = 2
    assert config == loaded[0]
    _assert_same_params(params, loaded[1])
    _, cls = _jitted(config)(params, images)
    assert_parity(cls, _reference_outputs(reference[0], images)[:, 0])


QKV = "blocks.1.attn.qkv.weight"
BAD_TIMM = {
    "missing": (
        lambda s: {k: v for k, v in s.items() if k != "blocks.1.norm2.bias"},
        "blocks.1.norm2.bias",
    ),
    "unknown": (lambda s: {**s, "head.weight": torch.ones(10, 128)}, "head.weight"),
    "qkv_shape": (lambda s: {**s, QKV: torch.ones(128, 128)}, QKV),
}


@pytest.mark.parametrize("case", sorted(BAD_TIMM))
def test_timm_bad_keys_are_named(timm_state, tmp_path, case):
    edit, key = BAD_TIMM[case]
    path = str(tmp_path / "bad.safetensors")
    save_file(edit(dict(timm_state)), path)
    with pytest.raises(CheckpointError) as err:
        vit_from_timm(path)
    message = str(err.value)
    assert "\n" not in message and repr(key) in message, message


def test_transformers_bad_folder_is_named(reference, tmp_path):
    folder = str(tmp_path)
    config = read_json(os.path.join(reference[1], "config.json"))
    write_json(os.path.join(folder, "config.json"), config)
    state = load_file(os.path.join(reference[1], SAFETENSORS))
    gone = "encoder.layer.1.output.dense.bias"
    save_file({k: v for k, v in state.items() if k != gone}, os.path.join(folder, SAFETENSORS))
    with pytest.raises(CheckpointError, match=repr(gone)):
        vit_from_transformers(folder)
    write_json(os.path.join(folder, "config.json"), {**config, "model_type": "dinov2"})
    with pytest.raises(CheckpointError, match="'dinov2' is not 'vit'"):
        vit_from_transformers(folder)


def test_wrong_image_size_is_rejected(loaded):
    config, params = loaded
    with pytest.raises(ValueError, match="takes 32x32"):
        ViT(config).apply({"params": params}, np.zeros((1, 24, 24, 3), np.float32))


def test_dino_vits16_layout_matches_transformers():
    """facebook/dino-vits16's geometry: our parameters have transformers' shapes, one to one."""
    config = ViTConfig.from_transformers(DINO_VITS16)
    assert (config.hidden_size, config.num_attention_heads, config.layer_norm_eps) == (384, 6, 1e-6)
    with torch.device("meta"):
        ref = transformers.ViTModel(transformers.ViTConfig(**DINO_VITS16), add_pooling_layer=False)
    theirs = sorted(tuple(v.shape) for v in ref.state_dict().values())
    flat = _flat(abstract_vit_params(config))
    ours = sorted(
        to_torch_layout(p[-1], np.broadcast_to(0.0, s.shape)).shape for p, s in flat.items()
    )
    assert ours == theirs
