"""Damaged or mismatched checkpoints fail with one-line `CheckpointError`s naming the problem.

The fixture is a tiny VAE folder in diffusers' layout whose weights are random values
shaped like the model (no model is run), so this file needs neither torch nor a compile.
"""

import os
import shutil

import jax
import numpy as np
import pytest

from sdjax.convert.files import (
    CheckpointError,
    file_mode_mask,
    read_safetensors,
    write_json,
    write_safetensors,
)
from sdjax.convert.keys import flax_to_torch
from sdjax.convert.vae import CONFIG, VAE_KEYS, WEIGHTS, abstract_vae_params, vae_from_diffusers
from sdjax.errors import UserError
from sdjax.models.vae import VAEConfig

CONV_KEY = "encoder.conv_in.weight"


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    config = VAEConfig(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: rng.normal(size=s.shape).astype(np.float32), abstract_vae_params(config)
    )
    folder = str(tmp_path_factory.mktemp("vae"))
    write_safetensors(os.path.join(folder, WEIGHTS), flax_to_torch(params, VAE_KEYS))
    write_json(os.path.join(folder, CONFIG), config.to_diffusers())
    return folder


@pytest.fixture
def folder(good_folder, tmp_path):
    """A private copy of the good folder for a test to damage."""
    return shutil.copytree(good_folder, str(tmp_path / "vae"))


def _state(folder):
    return dict(read_safetensors(os.path.join(folder, WEIGHTS)))


def _rewrite(folder, state):
    write_safetensors(os.path.join(folder, WEIGHTS), state)


def _load_error(path, *names) -> str:
    """Load `path`, expect a one-line CheckpointError mentioning every name, return it."""
    with pytest.raises(CheckpointError) as info:
        vae_from_diffusers(path)
    message = str(info.value)
    assert isinstance(info.value, UserError)  # the CLI prints these as `error: ...`
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)
    return message


def test_good_folder_loads(good_folder):
    config, params = vae_from_diffusers(good_folder)
    assert config.block_out_channels == (8, 16)
    assert params["encoder"]["conv_in"]["kernel"].shape == (3, 3, 3, 8)


def test_missing_key(folder):
    state = _state(folder)
    del state[CONV_KEY]
    _rewrite(folder, state)
    assert "missing" in _load_error(folder, CONV_KEY)


def test_unexpected_key(folder):
    state = _state(folder)
    state["encoder.conv_extra.weight"] = np.zeros((2,), np.float32)
    _rewrite(folder, state)
    assert "unexpected" in _load_error(folder, "encoder.conv_extra.weight")


def test_wrong_shape(folder):
    state = _state(folder)
    state[CONV_KEY] = np.zeros((8, 4, 3, 3), np.float32)
    _rewrite(folder, state)
    _load_error(folder, CONV_KEY, "(8, 4, 3, 3)", "(8, 3, 3, 3)")


def test_integer_tensor(folder):
    state = _state(folder)
    state[CONV_KEY] = np.zeros(state[CONV_KEY].shape, np.int32)
    _rewrite(folder, state)
    _load_error(folder, CONV_KEY, "int32")


@pytest.mark.parametrize("keep", [4, 100, -16])
def test_truncated_file(folder, keep):
    """Cut inside the length prefix, inside the JSON header, and inside the tensor data."""
    path = os.path.join(folder, WEIGHTS)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:keep])
    _load_error(folder, path)


def test_missing_config(folder):
    os.remove(os.path.join(folder, CONFIG))
    _load_error(folder, CONFIG)


def test_unreadable_config(folder):
    with open(os.path.join(folder, CONFIG), "w") as f:
        f.write("{not json")
    _load_error(folder, CONFIG)


def test_missing_weights(folder):
    os.remove(os.path.join(folder, WEIGHTS))
    _load_error(folder, WEIGHTS)


def test_missing_shard(folder):
    state = _state(folder)
    write_safetensors(os.path.join(folder, "part-1.safetensors"), state)
    os.remove(os.path.join(folder, WEIGHTS))
    weight_map = {k: "part-1.safetensors" for k in state} | {CONV_KEY: "part-2.safetensors"}
    write_json(os.path.join(folder, WEIGHTS + ".index.json"), {"weight_map": weight_map})
    _load_error(folder, "part-2.safetensors")


@pytest.mark.parametrize("where", ["file", "absent"])
def test_not_a_folder(folder, where):
    path = os.path.join(folder, WEIGHTS) if where == "file" else os.path.join(folder, "nowhere")
    _load_error(path, path)


def test_written_weights_are_readable_by_others_as_the_umask_says(tmp_path):
    path = str(tmp_path / "w.safetensors")
    write_safetensors(path, {"a": np.zeros(3, np.float32)})  # safetensors itself makes 0600
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~file_mode_mask()


def test_a_training_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    from types import SimpleNamespace

    from sdjax.checkpoint import manager, restore_params, save

    state = SimpleNamespace(
        step=np.int32(3),
        trainable={"unet/w": np.array([1.0, np.nan], np.float32)},  # flat, as training keeps
        frozen={"vae/f": np.ones(2, np.float32)},
        opt_state={"m": np.zeros(2, np.float32)},
        rng=np.zeros(2, np.uint32),
        ema=None,
    )
    mngr = manager(str(tmp_path))
    save(mngr, state, {}, {"config": {}})
    mngr.wait_until_finished()
    with pytest.raises(CheckpointError, match="1 non-finite values"):
        restore_params(str(tmp_path))
