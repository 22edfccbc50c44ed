"""configs/sd2_base.py shrunk for tests and quick benchmark runs: every part of the paper's
model (latent UNet with adapters and probes, VAE, CLIP text and image towers) at widths
8-64, 32 px images, 16 px latents. `OVERRIDES` are the `--set` items that shrink it."""

import os

from sdjax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = [
    "model.unet.block_out_channels=(8, 16)",
    "model.unet.down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D')",
    "model.unet.up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D')",
    "model.unet.layers_per_block=1",
    "model.unet.heads=(2, 2)",
    "model.unet.cross_attention_dim=16",
    "model.unet.norm_num_groups=4",
    "model.unet.probe_layers=('down_blocks_0', 'up_blocks_1')",
    "model.text.hidden_size=16",
    "model.text.intermediate_size=32",
    "model.text.num_hidden_layers=1",
    "model.text.num_attention_heads=2",
    "model.image.hidden_size=64",
    "model.image.intermediate_size=256",
    "model.image.projection_dim=16",
    "model.image.num_hidden_layers=1",
    "model.image.num_attention_heads=1",
    "model.image.image_size=16",
    "model.image.patch_size=8",
    "model.vae.block_out_channels=(8, 16)",
    "model.vae.down_block_types=('DownEncoderBlock2D', 'DownEncoderBlock2D')",
    "model.vae.up_block_types=('UpDecoderBlock2D', 'UpDecoderBlock2D')",
    "model.vae.layers_per_block=1",
    "model.vae.norm_num_groups=4",
    "model.resolution=32",
    "model.grounding_hidden=16",
    "data.worker_count=0",
    "train.batch_size=2",
    "train.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "mesh.fsdp=1",
]


def get_config():
    return load_config(os.path.join(ROOT, "configs", "sd2_base.py"), OVERRIDES)
