"""Subject-Diffusion on Stable Diffusion 1.5 at 512 px: `sd2_base.py`'s training setting
on SD 1.5's architecture (UNet with 8 heads and cross dim 768, OpenAI CLIP ViT-L/14 text
tower), with the CLIP ViT-L/14 image tower as the frozen image encoder.

    sdjax train --config configs/sd15.py --workdir runs/sd15 \\
        --set init.pretrained=/path/stable-diffusion-v1-5 \\
        --set init.image_encoder=/path/clip-vit-large-patch14 --set data.path=/path/records
"""

import os

from sdjax.config import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd2_base.py"))
    c.model.unet.update(  # runwayml/stable-diffusion-v1-5 unet/config.json, + 1 input channel
        heads=(8, 8, 8, 8),  # attention_head_dim 8: head widths 40, 80, 160, 160
        cross_attention_dim=768,
        use_linear_projection=False,
    )
    c.model.text.update(  # openai/clip-vit-large-patch14's text tower, as SD 1.5 ships it
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
    )
    c.model.image.update(  # openai/clip-vit-large-patch14's image tower
        hidden_size=1024,
        intermediate_size=4096,
        projection_dim=768,
        num_hidden_layers=24,
        num_attention_heads=16,
        hidden_act="quick_gelu",
    )
    return c
