"""configs/toy.py shrunk for tests: 16 px, 2 subject slots, a 64-scene toy world."""

import os

from sdjax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
    c = load_config(os.path.join(ROOT, "configs", "toy.py"))
    c.model.unet.update(
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        heads=(1, 1),
        cross_attention_dim=16,
        sample_size=16,
        norm_num_groups=4,
        probe_layers=("down_blocks_0", "up_blocks_1"),
    )
    c.model.text.update(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    c.model.image.update(
        hidden_size=16,
        intermediate_size=32,
        projection_dim=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    c.model.update(resolution=16, max_subjects=2, grounding_hidden=16)
    c.data.update(toy_n=64, toy_size=32)
    c.train.update(
        num_steps=6,
        batch_size=8,
        warmup_steps=2,
        checkpoint_every=4,
        log_every=1,
        preview_every=0,
    )
    c.mesh.update(data=1)
    c.sharding_rules = [
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("conv_out", "fsdp"),
        ("mlp", "fsdp"),
        ("heads", "fsdp"),
    ]
    return c
