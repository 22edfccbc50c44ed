"""The authors' setting (SPEC 4): Subject-Diffusion on Stable Diffusion 2-base at 512 px.

Needs user-supplied weights (nothing is downloaded):
    --set init.pretrained=/path/stable-diffusion-2-base        (diffusers pipeline folder)
    --set init.image_encoder=/path/open_clip_vit_h14.safetensors  (OpenCLIP ViT-H-14)
    --set data.path=/path/records                               (sdjax record shards)

    sdjax train --config configs/sd2_base.py --workdir runs/sd2 --set init.pretrained=... \\
        --set init.image_encoder=... --set data.path=...
"""

import ml_collections

from sdjax.train.state import AUTHORS_TRAINABLE


def get_config():
    c = ml_collections.ConfigDict()
    # Shapes come from the pretrained folders; these are sdjax's settings on top.
    c.model = dict(
        unet=dict(
            probe_layers=(
                "down_blocks_1",
                "down_blocks_2",
                "mid_block",
                "up_blocks_1",
                "up_blocks_2",
            ),  # cross-attention at 32/16/8 of 64x64 latents
            remat=True,
            dtype="bfloat16",
        ),
        text=dict(dtype="bfloat16", remat=True),
        image=dict(dtype="bfloat16"),
        resolution=512,
        max_subjects=2,
        grounding_hidden=1024,
        single_subject_box=False,  # the authors drop box coordinates for one subject
        region_attention=True,  # beyond the paper: subjects' tokens bound to their regions
    )
    c.init = dict(pretrained="", image_encoder="")
    c.data = dict(
        path="",
        describe_prob=1.0,
        p_text=0.05,
        p_both=0.05,
        p_mask=0.05,
        region_box_prob=0.25,
        worker_count=8,
    )
    c.train = dict(
        num_steps=300_000,
        batch_size=256,
        lr=3e-5,
        warmup_steps=1000,
        schedule_steps=0,  # length of the decay; 0: num_steps
        decay="constant",
        clip_norm=0.0,  # the authors do not clip
        ema=False,
        trainable=AUTHORS_TRAINABLE,
        checkpoint_every=5000,
        log_every=50,
        seed=0,
        preview_every=0,
        max_to_keep=3,
    )
    c.loss = dict(attn_weight=0.01, attn_form="balanced_l1")
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.sharding_rules = [
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("conv_out", "fsdp"),
        ("vocab", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
    ]
    return c
