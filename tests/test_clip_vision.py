"""The image encoder against transformers' `CLIPVisionModelWithProjection` and open_clip's
`VisionTransformer` (PyTorch).

Tiny random towers (32 px images, patch 8, 2 layers) are saved in each library's format
and loaded through `image_encoder_from_transformers` / `image_encoder_from_open_clip`.
Patch tokens (last block, before the final norm) and the projected CLS embedding must
match to 1e-4 relative.
"""

import functools
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from open_clip_ref import load_open_clip_transformer
from parity import assert_parity, nchw, randomise_
from safetensors.torch import save_file

from sdjax.convert.clip import (
    VISION_KEYS,
    abstract_image_params,
    image_encoder_from_transformers,
    image_encoder_to_transformers,
)
from sdjax.convert.files import CheckpointError
from sdjax.convert.keys import to_torch_layout
from sdjax.convert.open_clip import default_heads, image_encoder_from_open_clip
from sdjax.models.clip import CLIP_MEAN, CLIP_STD, CLIPVisionConfig
from sdjax.models.clip_vision import ImageEncoder

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    projection_dim=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)


@functools.cache
def _jitted(config):
    return jax.jit(lambda params, x: ImageEncoder(config).apply({"params": params}, x))


def _encode(config, params, images):
    return _jitted(config)(params, images)


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """(transformers CLIPVisionModelWithProjection with random weights, its saved folder)."""
    config = transformers.CLIPVisionConfig(**TINY, hidden_act="quick_gelu")
    ref = randomise_(transformers.CLIPVisionModelWithProjection(config)).eval()
    folder = str(tmp_path_factory.mktemp("vision"))
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


def _hf_encode(ref, images):
    with torch.no_grad():
        out = ref(pixel_values=nchw(images))
    return out.last_hidden_state[:, 1:].numpy(), out.image_embeds.numpy()


def test_matches_transformers(hf_reference, images):
    ref, folder = hf_reference
    config, params = image_encoder_from_transformers(folder)
    assert (config.image_size, config.mean, config.std) == (32, CLIP_MEAN, CLIP_STD)
    tokens, cls_embed = _encode(config, params, images)
    ref_tokens, ref_cls = _hf_encode(ref, images)
    assert tokens.shape == (2, 16, 32) and cls_embed.shape == (2, 24)
    assert_parity(tokens, ref_tokens)
    assert_parity(cls_embed, ref_cls)


def test_export_loads_in_transformers(hf_reference, images, tmp_path):
    ref, folder = hf_reference
    config, params = image_encoder_from_transformers(folder)
    image_encoder_to_transformers(config, params, str(tmp_path))
    back, info = transformers.CLIPVisionModelWithProjection.from_pretrained(
        str(tmp_path), output_loading_info=True
    )
    assert not any(info.values()), info
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)
    tokens, cls_embed = _encode(config, params, images)
    ref_tokens, ref_cls = _hf_encode(back.eval(), images)
    assert_parity(tokens, ref_tokens)
    assert_parity(cls_embed, ref_cls)


def test_wrong_image_size_is_rejected(hf_reference):
    config, params = image_encoder_from_transformers(hf_reference[1])
    with pytest.raises(ValueError, match="takes 32x32"):
        ImageEncoder(config).apply({"params": params}, np.zeros((1, 24, 24, 3), np.float32))


# open_clip towers: a whole CLIP model (with text-tower keys to skip) whose head count is
# inferred from its width, and a visual tower alone with explicit heads and QuickGELU.
OPEN_CLIP = {
    "whole_model_gelu": dict(width=128, heads=2, act="gelu", whole=True, given_heads=None),
    "tower_quick_gelu": dict(width=32, heads=4, act="quick_gelu", whole=False, given_heads=4),
}
TEXT_TOWER = {
    "token_embedding.weight": (1000, 32),
    "positional_embedding": (16, 32),
    "transformer.resblocks.0.ln_1.weight": (32,),
    "ln_final.weight": (32,),
    "text_projection": (32, 24),
    "logit_scale": (),
}


def _open_clip_tower(width, heads, act):
    oc = load_open_clip_transformer()
    act_layer = torch.nn.GELU if act == "gelu" else oc.QuickGELU
    tower = oc.VisionTransformer(
        image_size=32,
        patch_size=8,
        width=width,
        layers=2,
        heads=heads,
        mlp_ratio=4.0,
        output_dim=24,
        act_layer=act_layer,
    )
    return randomise_(tower).eval()


def _state(tower):
    return {k: v.contiguous() for k, v in tower.state_dict().items()}


def _whole_model(state, **extra):
    """The tower inside a whole CLIP model's state dict, plus `extra` keys."""
    whole = {"visual." + k: v for k, v in state.items()}
    whole.update({k: torch.ones(shape) for k, shape in TEXT_TOWER.items()}, **extra)
    return whole


def _save_open_clip(tower, path, whole: bool):
    save_file(_whole_model(_state(tower)) if whole else _state(tower), path)


@pytest.fixture(scope="module", params=sorted(OPEN_CLIP))
def open_clip_reference(request, tmp_path_factory):
    """(open_clip VisionTransformer with random weights, its safetensors file, case)."""
    case = OPEN_CLIP[request.param]
    tower = _open_clip_tower(case["width"], case["heads"], case["act"])
    path = str(tmp_path_factory.mktemp("open_clip") / "open_clip.safetensors")
    _save_open_clip(tower, path, case["whole"])
    return tower, path, case


def _open_clip_encode(tower, images):
    """(tokens after the last block before ln_post, projected pooled output)."""
    seen = {}
    handle = tower.transformer.register_forward_hook(lambda m, i, out: seen.update(x=out))
    try:
        with torch.no_grad():
            pooled = tower(nchw(images))
    finally:
        handle.remove()
    return seen["x"][:, 1:].numpy(), pooled.numpy()


def test_matches_open_clip(open_clip_reference, images):
    tower, path, case = open_clip_reference
    config, params = image_encoder_from_open_clip(path, heads=case["given_heads"], act=case["act"])
    assert config.num_attention_heads == case["heads"]
    assert (config.hidden_size, config.image_size, config.patch_size) == (case["width"], 32, 8)
    assert (config.num_hidden_layers, config.projection_dim) == (2, 24)
    tokens, cls_embed = _encode(config, params, images)
    ref_tokens, ref_cls = _open_clip_encode(tower, images)
    assert tokens.shape == (2, 16, case["width"])
    assert_parity(tokens, ref_tokens)
    assert_parity(cls_embed, ref_cls)


@pytest.fixture(scope="module")
def open_clip_state():
    """A tiny open_clip visual tower's state dict (tower alone)."""
    return _state(_open_clip_tower(32, 4, "gelu"))


LN_2 = "transformer.resblocks.1.ln_2.bias"
FUSED = "transformer.resblocks.0.attn.in_proj_bias"
BAD_OPEN_CLIP = {
    "missing": (lambda s: {k: v for k, v in s.items() if k != LN_2}, LN_2),
    "unknown": (lambda s: {**s, "ls_1.gamma": torch.ones(32)}, "ls_1.gamma"),
    "fused_shape": (lambda s: {**s, FUSED: torch.ones(32)}, FUSED),
    "unknown_visual": (lambda s: _whole_model(s, **{"visual.foo": torch.ones(1)}), "visual.foo"),
    "unknown_other": (lambda s: _whole_model(s, bar=torch.ones(1)), "bar"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPEN_CLIP))
def test_open_clip_bad_keys_are_named(open_clip_state, tmp_path, case):
    edit, key = BAD_OPEN_CLIP[case]
    path = os.path.join(tmp_path, "bad.safetensors")
    save_file(edit(open_clip_state), path)
    with pytest.raises(CheckpointError) as err:
        image_encoder_from_open_clip(path, heads=4)
    message = str(err.value)
    assert "\n" not in message and repr(key) in message, message


def test_open_clip_head_defaults():
    """width // 64 heads, except open_clip's big ViTs (ViT-H-14: 1280 wide, 16 heads of 80)."""
    assert [default_heads(w) for w in (512, 768, 1024, 1280, 1664)] == [8, 12, 16, 16, 16]


def test_vit_h_layout_matches_transformers():
    """OpenCLIP ViT-H-14's geometry: our parameters are transformers' keys and shapes."""
    fields = dict(
        hidden_size=1280,
        intermediate_size=5120,
        projection_dim=1024,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
    )
    with torch.device("meta"):
        ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**fields))
    flat = traverse_util.flatten_dict(
        nn.meta.unbox(abstract_image_params(CLIPVisionConfig(**fields)))
    )
    ours = {
        VISION_KEYS.torch_key(path): to_torch_layout(path[-1], np.broadcast_to(0.0, s.shape)).shape
        for path, s in flat.items()
    }
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
