"""The fusion text encoder against transformers' PyTorch `CLIPTextModel`.

Tiny random text towers (width 32, 2 layers, 4 heads, vocab 1000, 16 positions) in both
activations (`quick_gelu`: SD 1.x, `gelu`: SD 2.x) are saved by transformers and loaded
through `text_encoder_from_transformers`. Subject injection is checked against the
PyTorch model with a forward hook that overwrites the same token-embedding rows.
Outputs must match to 1e-4 relative; exported folders must load in transformers with no
missing or unexpected key.
"""

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from parity import assert_parity, randomise_

from sdjax.convert.clip import (
    CONFIG,
    TEXT_KEYS,
    WEIGHTS,
    abstract_text_params,
    text_encoder_from_transformers,
    text_encoder_to_transformers,
)
from sdjax.convert.files import (
    CheckpointError,
    read_json,
    read_safetensors,
    write_json,
    write_safetensors,
)
from sdjax.convert.keys import to_torch_layout
from sdjax.models.clip import CLIPTextConfig
from sdjax.models.clip_text import TextEncoder

TINY = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    bos_token_id=998,
)
BOS = 998
# (config's eos_token_id, EOS id in the prompts, padding id). quick_gelu: SD 1.x's legacy
# eos_token_id 2, pooled at the largest id (EOS 999), padded with EOS. gelu: the real EOS id,
# pooled at the first EOS, which here is not the largest id (BOS is), padded with 0.
ACTS = {"quick_gelu": (2, 999, 999), "gelu": (997, 997, 0)}


def _ids(eos: int, pad: int) -> np.ndarray:
    """Two prompts of 12 tokens: BOS, words, EOS, padding."""
    rng = np.random.default_rng(1)
    ids = np.full((2, 12), pad, np.int32)
    for row, words in enumerate((5, 9)):
        ids[row, : words + 2] = [BOS, *rng.integers(3, 900, words), eos]
    return ids


def _subjects():
    """Two slots per prompt; prompt 1's second slot is invalid (and points at a word)."""
    embeds = np.random.default_rng(2).normal(size=(2, 2, 32)).astype(np.float32)
    positions = np.array([[2, 4], [3, 7]], np.int32)
    valid = np.array([[True, True], [True, False]])
    return embeds, positions, valid


@pytest.fixture(scope="module", params=sorted(ACTS))
def reference(request, tmp_path_factory):
    """(transformers CLIPTextModel with random weights, its saved folder, prompt ids)."""
    act = request.param
    eos_token_id, eos, pad = ACTS[act]
    config = transformers.CLIPTextConfig(**TINY, hidden_act=act, eos_token_id=eos_token_id)
    ref = randomise_(transformers.CLIPTextModel(config)).eval()
    folder = str(tmp_path_factory.mktemp(f"text_{act}"))
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder, _ids(eos, pad)


@pytest.fixture(scope="module")
def loaded(reference):
    return text_encoder_from_transformers(reference[1])


@functools.cache
def _jitted(config):
    model = TextEncoder(config)
    return jax.jit(lambda params, ids, *subjects: model.apply({"params": params}, ids, *subjects))


def _encode(config, params, ids, subjects=()):
    """Our (hidden, pooled); subjects: () or (embeds, positions, valid)."""
    return _jitted(config)(params, ids, *subjects)


def _torch_encode(model, ids, subjects=()):
    """transformers' outputs; with subjects, a hook overwrites the token-embedding rows."""
    handle = None
    if subjects:
        embeds, positions, valid = subjects

        def inject(module, inputs, output):
            output = output.clone()
            for b, s in zip(*np.nonzero(valid)):
                output[b, positions[b, s]] = torch.from_numpy(embeds[b, s])
            return output

        handle = model.text_model.embeddings.token_embedding.register_forward_hook(inject)
    try:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids).long())
    finally:
        if handle is not None:
            handle.remove()
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def test_matches_transformers(reference, loaded):
    ref, _, ids = reference
    hidden, pooled = _encode(*loaded, ids)
    ref_hidden, ref_pooled = _torch_encode(ref, ids)
    assert hidden.shape == (2, 12, 32) and pooled.shape == (2, 32)
    assert_parity(hidden, ref_hidden)
    assert_parity(pooled, ref_pooled)


def test_injected_subjects_match_pytorch_hook(reference, loaded):
    ref, _, ids = reference
    subjects = _subjects()
    hidden, pooled = _encode(*loaded, ids, subjects)
    ref_hidden, ref_pooled = _torch_encode(ref, ids, subjects)
    assert_parity(hidden, ref_hidden)
    assert_parity(pooled, ref_pooled)
    plain, _ = _encode(*loaded, ids)
    # Causal attention: tokens before the first subject are untouched, the rest change.
    np.testing.assert_allclose(hidden[:, :2], plain[:, :2], atol=1e-6)
    assert np.abs(np.asarray(hidden[:, 2:]) - np.asarray(plain[:, 2:])).max() > 1e-2


def test_export_loads_in_transformers(reference, loaded, tmp_path):
    ref, _, ids = reference
    config, params = loaded
    text_encoder_to_transformers(config, params, str(tmp_path))
    back, info = transformers.CLIPTextModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info.values()), info
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)
    subjects = _subjects()
    hidden, pooled = _encode(config, params, ids, subjects)
    ref_hidden, ref_pooled = _torch_encode(back.eval(), ids, subjects)
    assert_parity(hidden, ref_hidden)
    assert_parity(pooled, ref_pooled)
    assert text_encoder_from_transformers(str(tmp_path))[0] == config


def test_remat_gives_the_same_gradients_to_subjects(reference, loaded):
    """Gradient checkpointing changes memory, not math; gradients reach valid slots only."""
    _, _, ids = reference
    config, params = loaded
    embeds, positions, valid = _subjects()

    def grad(cfg):
        def loss(e):
            hidden, pooled = TextEncoder(cfg).apply({"params": params}, ids, e, positions, valid)
            return jnp.sum(hidden**2) + jnp.sum(pooled)

        return np.asarray(jax.jit(jax.grad(loss))(embeds))

    plain, remat = grad(config), grad(dataclasses.replace(config, remat=True))
    np.testing.assert_allclose(remat, plain, rtol=1e-5, atol=1e-6)
    assert np.abs(plain[valid]).min() > 0
    assert not plain[~valid].any()


def _rewrite(folder, tmp_path, edit):
    """A copy of a saved folder whose weights went through `edit(state)`."""
    state = dict(read_safetensors(os.path.join(folder, WEIGHTS)))
    edit(state)
    write_safetensors(os.path.join(tmp_path, WEIGHTS), state)
    write_json(os.path.join(tmp_path, CONFIG), read_json(os.path.join(folder, CONFIG)))
    return str(tmp_path)


FC2_BIAS = "text_model.encoder.layers.1.mlp.fc2.bias"
FINAL_NORM = "text_model.final_layer_norm.weight"
EXTRA = "text_model.encoder.layers.2.mlp.fc1.weight"


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda s: s.pop(FC2_BIAS), ("missing key", FC2_BIAS)),
        (lambda s: s.update({FINAL_NORM: np.ones(31, np.float32)}), (FINAL_NORM, "(31,)")),
        (lambda s: s.update({EXTRA: np.ones((64, 32), np.float32)}), ("unexpected key", EXTRA)),
    ],
    ids=["missing", "shape", "unexpected"],
)
def test_damaged_folder_is_one_line_error(reference, tmp_path, edit, words):
    folder = _rewrite(reference[1], tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        text_encoder_from_transformers(folder)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_position_ids_buffer_is_ignored(reference, loaded, tmp_path):
    buffer = {"text_model.embeddings.position_ids": np.arange(16, dtype=np.int64)[None]}
    folder = _rewrite(reference[1], tmp_path, lambda s: s.update(buffer))
    _, params = text_encoder_from_transformers(folder)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, loaded[1]))


def test_unsupported_config_names_the_field(reference, tmp_path):
    folder = _rewrite(reference[1], tmp_path, lambda s: None)
    config = read_json(os.path.join(folder, CONFIG))
    write_json(os.path.join(folder, CONFIG), {**config, "hidden_act": "relu"})
    with pytest.raises(CheckpointError, match="hidden_act 'relu'"):
        text_encoder_from_transformers(folder)


# The text_encoder/config.json fields of SD 1.5 (CLIP ViT-L/14) and SD 2.x (OpenCLIP ViT-H).
SD_TEXT_ENCODERS = {
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, hidden_act="quick_gelu"),
    "sd2": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                num_hidden_layers=23, hidden_act="gelu"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SD_TEXT_ENCODERS))
def test_sd_text_encoder_layout_matches_transformers(name):
    """Real-size configs: our parameters are exactly transformers' keys and shapes."""
    fields = dict(SD_TEXT_ENCODERS[name], vocab_size=49408, max_position_embeddings=77)
    fields.update(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    config = CLIPTextConfig.from_transformers({**fields, "model_type": "clip_text_model"})
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**fields))
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_text_params(config)))
    ours = {
        TEXT_KEYS.torch_key(path): to_torch_layout(path[-1], np.broadcast_to(0.0, s.shape)).shape
        for path, s in flat.items()
    }
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
