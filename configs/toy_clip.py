"""The toy world's CLIP: contrastive pre-training of the image encoder that the embedded
Subject-Diffusion model (configs/toy.py) then uses frozen, as the paper uses OpenCLIP.

    sdjax train --config configs/toy_clip.py --workdir workdirs/toy_clip
    sdjax train --config configs/toy.py --workdir workdirs/toy \\
        --set init.image_encoder=workdirs/toy_clip

Pairs: one subject's augmented reference view <-> "a red striped star". The towers match
configs/toy.py's `model.image` and `model.text` shapes.
"""

import os

from sdjax.config import load_config


def get_config():
    toy = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy.py"))
    c = toy.copy_and_resolve_references()
    c.task = "clip"
    c.model = dict(
        image=toy.model.image.to_dict(),
        text=toy.model.text.to_dict(),
        vocab="toy",
        attention=toy.model.attention,
    )
    c.data.p_text = c.data.p_both = c.data.p_mask = 0.0
    c.train.update(
        num_steps=1500,
        batch_size=128,
        lr=1e-3,
        warmup_steps=100,
        schedule_steps=0,  # length of the decay; 0: num_steps
        decay="cosine",
        trainable=(".*",),
        checkpoint_every=500,
        log_every=10,
        preview_every=0,
    )
    del c["loss"]
    return c
