"""Tiny random Subject-Diffusion pipelines for tests (pixel space, 16 px, 2 subject slots)."""

from __future__ import annotations

import dataclasses

from parity import random_params

from sdjax.models.clip import CLIPTextConfig, CLIPVisionConfig
from sdjax.models.unet_config import UNetConfig
from sdjax.pipeline import Pipeline, make_tokenizer
from sdjax.subject_diffusion import ModelConfig, abstract_params
from sdjax.tokenizer import Tokenizer

WORDS = ["a", "red", "blue", "green", "star", "ring", "square", "on", "white", "background", "and"]


def tiny_config(**overrides) -> ModelConfig:
    tokens = Tokenizer.for_vocabulary(WORDS, max_length=24)
    config = ModelConfig(
        unet=UNetConfig(
            block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            heads=(2, 2),
            cross_attention_dim=16,
            in_channels=4,
            out_channels=3,
            sample_size=16,
            norm_num_groups=4,
            adapter=True,
            probe_layers=("down_blocks_0", "up_blocks_1"),
        ),
        text=CLIPTextConfig(
            vocab_size=tokens.vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=24,
            hidden_act="gelu",
            bos_token_id=tokens.vocab_subset.index(49406),
            eos_token_id=tokens.vocab_subset.index(49407),
            pad_token_id=tokens.vocab_subset.index(49407),
        ),
        image=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            projection_dim=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
            hidden_act="gelu",
        ),
        resolution=16,
        max_subjects=2,
        grounding_hidden=16,
        vocab_subset=tokens.vocab_subset,
    )
    return dataclasses.replace(config, **overrides)


def tiny_pipeline(seed: int = 0, **overrides) -> Pipeline:
    return pipeline_for(tiny_config(**overrides), seed)


def tiny_latent_config() -> ModelConfig:
    """The tiny model in a VAE's latent space (16 px images, 8 px latents), like SD."""
    from sdjax.models.vae import VAEConfig

    base = tiny_config()
    vae = VAEConfig(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        sample_size=16,
    )
    unet = dataclasses.replace(base.unet, in_channels=5, out_channels=4, sample_size=8)
    return dataclasses.replace(base, unet=unet, vae=vae)


def pipeline_for(config: ModelConfig, seed: int = 0) -> Pipeline:
    params = random_params(abstract_params(config), seed=seed, std=0.1)
    return Pipeline(config, params, make_tokenizer(config))
