"""CLIP metric models (image + text towers with projections) against their PyTorch references.

- transformers `CLIPModel` (tiny, random, OpenAI-style: QuickGELU, legacy eos_token_id 2
  so text pools at the largest id) saved by transformers, loaded by `load_clip(folder)`:
  `image_embeds` / `text_embeds` / logits against `get_image_features` /
  `get_text_features` / `logits_per_image`.
- open_clip: its `VisionTransformer` and `TextTransformer` (open_clip's CLIP model class
  cannot be imported without torchvision) with a `logit_scale`, saved as one whole-model
  safetensors file (`visual.*` + top-level text keys), loaded by `load_clip(path)`.
All outputs must match to 1e-4 relative. The real ViT-B/32 and ViT-L/14 geometries must
map one to one onto transformers' `CLIPModel` keys and shapes.
"""

import functools

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

from sdjax.convert.files import CheckpointError
from sdjax.convert.keys import to_torch_layout
from sdjax.errors import UserError
from sdjax.eval.metric_models import CLIP_KEYS, load_clip
from sdjax.models.clip_model import CLIPConfig, CLIPModel, abstract_clip_params

TEXT = dict(
    vocab_size=1000,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    hidden_act="quick_gelu",
    bos_token_id=997,
    eos_token_id=2,  # OpenAI CLIP's transformers configs: pool at the largest id
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    hidden_act="quick_gelu",
)
EMBED = 24
BOS, EOS = 997, 999  # EOS is the largest id, as 49407 is in CLIP's vocabulary


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def ids():
    """Three prompts of 16 tokens: BOS, words, EOS, zero padding; the last one is cut
    without EOS and holds a word id above BOS, so pooling at the largest id (both
    references) and at the first EOS (a newer transformers config) differ there."""
    rng = np.random.default_rng(1)
    out = np.zeros((3, 16), np.int32)
    for row, words in enumerate((4, 11)):
        out[row, : words + 2] = [BOS, *rng.integers(3, 900, words), EOS]
    out[2] = [BOS, *rng.integers(3, 900, 15)]
    out[2, 6] = 998
    return out


@functools.cache
def _jitted(config):
    def run(params, images, ids):
        variables = {"params": params}
        model = CLIPModel(config)
        return (
            model.apply(variables, images, method="image_embeds"),
            model.apply(variables, ids, method="text_embeds"),
            model.apply(variables, images, ids),
        )

    return jax.jit(run)


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """(transformers CLIPModel with random weights, its saved folder)."""
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=EMBED)
    ref = randomise_(transformers.CLIPModel(config)).eval()
    folder = str(tmp_path_factory.mktemp("clip"))
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


def test_matches_transformers(hf_reference, images, ids):
    ref, folder = hf_reference
    config, params = load_clip(folder)
    assert (config.projection_dim, config.text.eos_token_id) == (EMBED, 2)
    image_embeds, text_embeds, logits = _jitted(config)(params, images, ids)
    with torch.no_grad():
        pixels, tokens = nchw(images), torch.from_numpy(ids).long()
        ref_image = ref.get_image_features(pixel_values=pixels).numpy()
        ref_text = ref.get_text_features(input_ids=tokens).numpy()
        ref_logits = ref(input_ids=tokens, pixel_values=pixels).logits_per_image.numpy()
    assert image_embeds.shape == (3, EMBED) and text_embeds.shape == (3, EMBED)
    assert_parity(image_embeds, ref_image)
    assert_parity(text_embeds, ref_text)
    assert_parity(logits, ref_logits)


def test_folder_rejects_open_clip_options(hf_reference):
    with pytest.raises(UserError, match="drop act, heads"):
        load_clip(hf_reference[1], heads=4, act="gelu")


def _open_clip_model():
    """(visual tower, text tower, logit_scale) of a tiny open_clip CLIP, random weights."""
    oc = load_open_clip_transformer()
    common = dict(layers=2, heads=4, output_dim=EMBED, act_layer=oc.QuickGELU)
    visual = oc.VisionTransformer(image_size=32, patch_size=8, width=32, mlp_ratio=2.0, **common)
    text = oc.TextTransformer(context_length=16, vocab_size=1000, width=48, **common)
    logit_scale = torch.nn.Parameter(torch.tensor(0.0))
    for i, module in enumerate((visual, text)):
        randomise_(module, seed=i).eval()
    with torch.no_grad():
        logit_scale.fill_(1.3)
    return visual, text, logit_scale


def _whole_state(visual, text, logit_scale) -> dict:
    """open_clip's CLIP state dict: `visual.*`, the text tower at the top, `logit_scale`."""
    state = {"visual." + k: v for k, v in visual.state_dict().items()}
    state.update(text.state_dict(), logit_scale=logit_scale.detach())
    return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def open_clip_reference(tmp_path_factory):
    """(visual, text, logit_scale, state dict, path of the saved file)."""
    visual, text, logit_scale = _open_clip_model()
    state = _whole_state(visual, text, logit_scale)
    path = str(tmp_path_factory.mktemp("open_clip") / "clip.safetensors")
    save_file(state, path)
    return visual, text, logit_scale, state, path


def test_matches_open_clip(open_clip_reference, images, ids):
    visual, text, logit_scale, _, path = open_clip_reference
    config, params = load_clip(path, heads=4, text_heads=4, act="quick_gelu")
    assert (config.text.hidden_size, config.vision.hidden_size, config.projection_dim) == (
        48,
        32,
        EMBED,
    )
    image_embeds, text_embeds, logits = _jitted(config)(params, images, ids)
    with torch.no_grad():
        ref_image = visual(nchw(images))
        ref_text = text(torch.from_numpy(ids).long())
        unit = [torch.nn.functional.normalize(x, dim=-1) for x in (ref_image, ref_text)]
        ref_logits = logit_scale.exp() * unit[0] @ unit[1].T
    assert_parity(image_embeds, ref_image.numpy())
    assert_parity(text_embeds, ref_text.numpy())
    assert_parity(logits, ref_logits.numpy())


BAD_OPEN_CLIP = {
    "missing_text": (
        lambda s: {k: v for k, v in s.items() if k != "ln_final.bias"},
        "ln_final.bias",
    ),
    "missing_head": (lambda s: {k: v for k, v in s.items() if k != "logit_scale"}, "logit_scale"),
    "siglip_bias": (lambda s: {**s, "logit_bias": torch.zeros(())}, "logit_bias"),
    "projection": (lambda s: {**s, "text_projection": torch.ones(48, 7)}, "text_projection"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPEN_CLIP))
def test_open_clip_bad_keys_are_named(open_clip_reference, tmp_path, case):
    edit, key = BAD_OPEN_CLIP[case]
    path = str(tmp_path / "bad.safetensors")
    save_file(edit(dict(open_clip_reference[3])), path)
    with pytest.raises(CheckpointError) as err:
        load_clip(path, heads=4, text_heads=4)
    message = str(err.value)
    assert "\n" not in message and repr(key) in message, message


# The towers of OpenAI's ViT-B/32 and ViT-L/14 (openai/clip-vit-*-patch* config.json).
GEOMETRIES = {
    "ViT-B-32": (
        dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, patch_size=32),
        dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8),
        512,
    ),
    "ViT-L-14": (
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=24,
            patch_size=14,
        ),
        dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        768,
    ),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_layout_matches_transformers(name):
    vision, text, embed = GEOMETRIES[name]
    fields = dict(
        model_type="clip",
        projection_dim=embed,
        text_config=dict(text, hidden_act="quick_gelu", eos_token_id=2),
        vision_config=dict(vision, hidden_act="quick_gelu", image_size=224),
    )
    with torch.device("meta"):
        ref = transformers.CLIPModel(transformers.CLIPConfig(**fields))
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items() if "position_ids" not in k}
    flat = traverse_util.flatten_dict(
        nn.meta.unbox(abstract_clip_params(CLIPConfig.from_transformers(fields)))
    )
    ours = {
        CLIP_KEYS.torch_key(path): to_torch_layout(path[-1], np.broadcast_to(0.0, s.shape)).shape
        for path, s in flat.items()
    }
    assert ours == theirs
