"""The VAE against diffusers' PyTorch `AutoencoderKL`: parity, import/export, config checks.

A tiny random VAE (channels 8/16, 16 px images) is saved the way diffusers saves it and
loaded through `vae_from_diffusers`; outputs must match PyTorch to 1e-4 relative.
"""

import copy
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from parity import assert_parity, nchw, nhwc, randomise_

from sdjax.convert.files import write_json, write_safetensors
from sdjax.convert.keys import flax_to_torch
from sdjax.convert.vae import (
    VAE_KEYS,
    WEIGHTS,
    abstract_vae_params,
    vae_from_diffusers,
    vae_to_diffusers,
)
from sdjax.errors import UserError
from sdjax.models.vae import AutoencoderKL, VAEConfig, sample_posterior, scale_latents

TINY = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    sample_size=16,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(PyTorch VAE with random weights, the folder it saved itself to)."""
    ref = randomise_(TorchVAE(**TINY)).eval()
    folder = str(tmp_path_factory.mktemp("vae"))
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


@pytest.fixture(scope="module")
def loaded(reference):
    return vae_from_diffusers(reference[1])


@pytest.fixture(scope="module")
def run(loaded):
    """Jitted `run(method, params, x)` for our VAE of the tiny config."""
    model = AutoencoderKL(loaded[0])
    jitted = {
        name: jax.jit(lambda p, x, name=name: model.apply({"params": p}, x, method=name))
        for name in ("encode", "decode", "images_to_latents", "latents_to_images")
    }
    return lambda method, params, x: jitted[method](params, x)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


def _torch_encode(ref, images):
    with torch.no_grad():
        posterior = ref.encode(nchw(images)).latent_dist
    return nhwc(posterior.mean), nhwc(posterior.logvar)


def _torch_decode(ref, latents):
    with torch.no_grad():
        return nhwc(ref.decode(nchw(latents)).sample)


def test_encode_matches_pytorch(reference, loaded, run, images):
    mean, logvar = run("encode", loaded[1], images)
    ref_mean, ref_logvar = _torch_encode(reference[0], images)
    assert mean.shape == (2, 8, 8, 4)
    assert_parity(mean, ref_mean)
    assert_parity(logvar, ref_logvar)


def test_decode_matches_pytorch(reference, loaded, run):
    latents = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
    out = run("decode", loaded[1], latents)
    assert out.shape == (2, 16, 16, 3)
    assert_parity(out, _torch_decode(reference[0], latents))


def test_scaled_latents_match_pipeline_use(reference, loaded, run, images):
    """SD pipelines: latents = posterior mode * scaling_factor; images = decode(latents / s)."""
    ref, (config, params) = reference[0], loaded
    latents = run("images_to_latents", params, images)
    assert_parity(latents, _torch_encode(ref, images)[0] * config.scaling_factor)
    decoded = run("latents_to_images", params, np.asarray(latents))
    assert_parity(decoded, _torch_decode(ref, np.asarray(latents) / config.scaling_factor))


def test_export_round_trip(reference, loaded, run, images, tmp_path):
    config, params = loaded
    vae_to_diffusers(config, params, str(tmp_path))
    exported = TorchVAE.from_pretrained(str(tmp_path)).eval()
    ref_state = reference[0].state_dict()
    assert exported.state_dict().keys() == ref_state.keys()
    for key, value in exported.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    mean, _ = run("encode", params, images)
    assert_parity(mean, _torch_encode(exported, images)[0])

    config2, params2 = vae_from_diffusers(str(tmp_path))
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_checkpoint_loads(reference, loaded, tmp_path):
    state = flax_to_torch(loaded[1], VAE_KEYS)
    keys = sorted(state)
    shards = {"part-1.safetensors": keys[::2], "part-2.safetensors": keys[1::2]}
    for shard, names in shards.items():
        write_safetensors(str(tmp_path / shard), {k: state[k] for k in names})
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    write_json(str(tmp_path / f"{WEIGHTS}.index.json"), {"weight_map": weight_map})
    write_json(str(tmp_path / "config.json"), loaded[0].to_diffusers())
    _, params = vae_from_diffusers(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_loads(reference, tmp_path, dtype):
    half = copy.deepcopy(reference[0]).to(dtype)
    half.save_pretrained(str(tmp_path), safe_serialization=True)
    _, params = vae_from_diffusers(str(tmp_path))
    ours = flax_to_torch(params, VAE_KEYS)
    for key, value in half.state_dict().items():
        np.testing.assert_array_equal(ours[key], value.float().numpy(), err_msg=key)


def test_posterior_sample_and_logvar_clip():
    mean = jnp.full((4096,), 1.0)
    draws = sample_posterior(jax.random.key(0), mean, jnp.full((4096,), np.log(4.0)))
    assert abs(float(draws.mean()) - 1.0) < 0.1
    assert abs(float(draws.std()) - 2.0) < 0.1
    rng = jax.random.key(1)
    clipped = sample_posterior(rng, mean, jnp.full((4096,), 20.0))
    np.testing.assert_array_equal(sample_posterior(rng, mean, jnp.full((4096,), 99.0)), clipped)


def test_shift_factor_scaling():
    config = VAEConfig(scaling_factor=0.5, shift_factor=0.25)
    assert float(scale_latents(config, jnp.float32(1.25))) == 0.5


def test_config_round_trips_through_diffusers():
    config = VAEConfig.from_diffusers({**TINY, "_diffusers_version": "0.39.0"})
    d = config.to_diffusers()
    assert VAEConfig.from_diffusers(json.loads(json.dumps(d))) == config
    assert VAEConfig.from_diffusers(dict(TorchVAE.from_config(d).config)) == config


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False},
        {
            "block_out_channels": (8, 16, 16),
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
            "layers_per_block": 2,
            "latent_channels": 3,
        },
    ],
)
def test_parameter_layout_matches_diffusers(variant):
    """Every key and shape of diffusers' state dict, for configs the parity test skips."""
    d = {**TINY, **variant}
    abstract = nn.meta.unbox(abstract_vae_params(VAEConfig.from_diffusers(d)))
    ours = flax_to_torch(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract), VAE_KEYS)
    ref = TorchVAE(**d).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize(
    "change, field",
    [
        (
            {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
            "down_block_types",
        ),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"norm_num_groups": 3}, "block_out_channels"),
        ({"latents_mean": [0.0] * 4}, "latents_mean"),
        ({"norm_type": "spatial"}, "norm_type"),
    ],
)
def test_unsupported_config_is_one_line_error(change, field):
    with pytest.raises(UserError) as info:
        VAEConfig.from_diffusers({**TINY, **change})
    message = str(info.value)
    assert field in message and "\n" not in message


def test_unsupported_config_in_folder(reference, tmp_path):
    with open(os.path.join(reference[1], "config.json")) as f:
        config = json.load(f)
    write_json(str(tmp_path / "config.json"), {**config, "act_fn": "relu"})
    os.symlink(os.path.join(reference[1], WEIGHTS), tmp_path / WEIGHTS)
    with pytest.raises(UserError, match="act_fn"):
        vae_from_diffusers(str(tmp_path))
