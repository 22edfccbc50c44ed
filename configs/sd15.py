"""Subject-Diffusion on Stable Diffusion 1.5 at 512 px (CLIP ViT-L/14 text tower, cross
dim 768). Every setting is `sd2_base.py`'s: the shapes come from the pretrained folder.

    sdjax train --config configs/sd15.py --workdir runs/sd15 \\
        --set init.pretrained=/path/stable-diffusion-v1-5 \\
        --set init.image_encoder=/path/image_encoder --set data.path=/path/records
"""

import os

from sdjax.config import load_config


def get_config():
    return load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd2_base.py"))
