"""The paper's training path end to end: `configs/sd2_base.py`, shrunk by `--set`, trains
from a Stable Diffusion 2-style diffusers folder and an open_clip image encoder written in
the real formats (tiny random weights), checkpoints, and resumes; weights that do not match
the config's architecture are refused in one line."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from open_clip_ref import load_open_clip_transformer
from parity import randomise_
from safetensors.torch import save_file
from sd2_tiny import OVERRIDES

from sdjax.cli import main
from sdjax.data.generate import write_toy_dataset
from sdjax.tokenizer import BUILTIN_VOCAB

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD2 = os.path.join(ROOT, "configs", "sd2_base.py")
SCHEDULER = {  # stabilityai/stable-diffusion-2-base scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def write_sd2_folder(root: str) -> None:
    """A diffusers SD 2-style pipeline folder with tiny random weights."""
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        use_linear_projection=True,
        norm_num_groups=4,
    )
    randomise_(unet, std=0.1).save_pretrained(os.path.join(root, "unet"), safe_serialization=True)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    randomise_(vae, std=0.1).save_pretrained(os.path.join(root, "vae"), safe_serialization=True)
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=49408,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    text.save_pretrained(os.path.join(root, "text_encoder"), safe_serialization=True)
    shutil.copytree(BUILTIN_VOCAB, os.path.join(root, "tokenizer"))
    os.makedirs(os.path.join(root, "scheduler"))
    with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f)


def write_open_clip(path: str) -> None:
    """An open_clip ViT (16 px, 8 px patches, width 64: one head) as safetensors."""
    oc = load_open_clip_transformer()
    tower = oc.VisionTransformer(
        image_size=16, patch_size=8, width=64, layers=1, heads=1, mlp_ratio=4.0, output_dim=16
    )
    save_file({k: v.contiguous() for k, v in randomise_(tower).state_dict().items()}, path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2")
    write_sd2_folder(str(root / "sd2"))
    write_open_clip(str(root / "vit.safetensors"))
    write_toy_dataset(str(root / "data"), 16, seed=0, size=32, overwrite=True)
    return str(root)


def train(weights, workdir, *extra):
    argv = ["train", "--config", SD2, "--workdir", workdir]
    sets = [
        *OVERRIDES,
        f"init.pretrained={weights}/sd2",
        f"init.image_encoder={weights}/vit.safetensors",
        f"data.path={weights}/data",
        *extra,
    ]
    for item in sets:
        argv += ["--set", item]
    return main(argv)


def steps_logged(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow  # about 70 s; the refusal tests below load the same files by default
def test_sd2_config_trains_from_pretrained_files_and_resumes(weights, tmp_path, capsys):
    torch.manual_seed(0)
    workdir = str(tmp_path / "run")
    assert train(weights, workdir, "train.num_steps=2") == 0
    first = steps_logged(workdir)
    assert [r["step"] for r in first] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 and "attn" in r for r in first)
    assert train(weights, workdir, "train.num_steps=3") == 0
    assert "resumed from step 2" in capsys.readouterr().out
    again = steps_logged(workdir)
    assert [r["step"] for r in again] == [1, 2, 3] and again[:2] == first


def test_weights_that_do_not_match_the_config_are_refused(weights, tmp_path, capsys):
    status = train(
        weights, str(tmp_path / "run"), "train.num_steps=1", "model.unet.cross_attention_dim=32"
    )
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err
    assert "unet does not match the config's architecture: cross_attention_dim 16" in err


def test_missing_weights_are_one_line_errors(weights, tmp_path, capsys):
    status = train(weights, str(tmp_path / "run"), "init.pretrained=/nonexistent/sd2")
    assert status == 2 and "init.pretrained: not a folder" in capsys.readouterr().err
