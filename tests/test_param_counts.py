"""Parameter counts of the paper-size model (docs/method.md §3): the SD 2-base UNet with the
location channel and adapters, and GroundingNet, against closed-form counts and against diffusers'
own gated UNet (built on the meta device: no memory, no weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import UNet2DConditionModel
from flax.traverse_util import flatten_dict

from sdjax.models.grounding import BOX_DIM, GroundingNet
from sdjax.models.layers import unbox
from sdjax.models.unet import init_unet
from sdjax.models.unet_config import UNetConfig

SD2_BASE_UNET = 865_910_724  # stabilityai/stable-diffusion-2-base unet, 4 input channels
SD2_BASE = dict(  # SD 2-base with the location channel, gated (adapters)
    sample_size=64,
    in_channels=5,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    use_linear_projection=True,
    attention_type="gated",
)


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def adapter_count(d: int, c: int) -> int:
    """One gated self-attention adapter on width d with objs of width c: the objs
    projection (c*d + d), q/k/v (3 d^2, no bias) and out (d^2 + d), a GEGLU feed-forward
    (d -> 8d -> 4d -> d: 8d^2 + 8d + 4d^2 + d), two layer norms (4d), two gates (2)."""
    return 16 * d * d + c * d + 15 * d + 2


def test_sd2_base_unet_with_adapters_matches_diffusers_and_closed_form():
    config = UNetConfig(in_channels=5, adapter=True)
    shapes = unbox(jax.eval_shape(lambda: init_unet(config, jax.random.key(0))))
    flat = {"/".join(k): v for k, v in flatten_dict(shapes).items()}
    adapters = sum(int(np.prod(v.shape)) for k, v in flat.items() if "/fuser/" in k)
    # transformer blocks: 5 at 320 and 640 channels (2 down, 3 up), 6 at 1280 (2+3+mid)
    expected_adapters = 5 * adapter_count(320, 1024) + 5 * adapter_count(640, 1024)
    expected_adapters += 6 * adapter_count(1280, 1024)
    assert adapters == expected_adapters == 211_213_152  # the paper's code: ~211M
    location_channel = 320 * 3 * 3  # conv_in's extra input channel
    assert count(shapes) == SD2_BASE_UNET + location_channel + expected_adapters
    with torch.device("meta"):
        ref = UNet2DConditionModel(**SD2_BASE)
    position_net = sum(p.numel() for p in ref.position_net.parameters())  # GLIGEN's, not ours
    assert count(shapes) == sum(p.numel() for p in ref.parameters()) - position_net


def test_grounding_net_closed_form():
    patches, width, hidden, out = 256, 1280, 1024, 1024  # OpenCLIP ViT-H/14 at 224 px
    net = GroundingNet(out, hidden)
    inputs = (
        jnp.zeros((1, 2, patches, width)),
        jnp.zeros((1, 2, 4)),
        jnp.ones((1, 2), bool),
    )
    shapes = unbox(jax.eval_shape(lambda: net.init(jax.random.key(0), *inputs)["params"]))
    d_in = width + BOX_DIM
    expected = patches * width + patches * BOX_DIM  # null patch and position features
    expected += 2 * d_in + d_in * hidden + hidden + hidden * out + out  # LN + 2 linears
    assert count(shapes) == expected == 2_773_632


def config_counts(path: str) -> tuple[dict, int]:
    """Parameters per part of the model a config file describes (no weights), and how many
    the config trains."""
    import os

    from sdjax.config import load_config
    from sdjax.subject_diffusion import abstract_params
    from sdjax.train.state import flatten, split_trainable
    from sdjax.train.tasks.subject_diffusion import model_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(root, "configs", path))
    shapes = unbox(abstract_params(model_config(config)[0]))
    trainable, _ = split_trainable(flatten(shapes), tuple(config.train.trainable))
    return {k: count(v) for k, v in shapes.items()}, count(trainable)


def test_sd2_base_config_describes_the_paper_model():
    parts, trainable = config_counts("sd2_base.py")
    assert parts == {
        "unet": 1_077_126_756,  # SD 2-base + location channel + adapters
        "text_encoder": 340_387_840,  # OpenCLIP ViT-H text tower
        "image_encoder": 632_076_800,  # OpenCLIP ViT-H/14
        "vae": 83_653_863,
        "grounding": 2_773_632,
        "cls_mlp": 2_101_248,
    }
    assert sum(parts.values()) == 2_138_120_139 and trainable == 582_049_632  # §4's set


def test_sd15_config_matches_the_reference_models():
    import transformers

    parts, _ = config_counts("sd15.py")
    with torch.device("meta"):
        sd15 = {"attention_head_dim": 8, "cross_attention_dim": 768, "use_linear_projection": False}
        unet = UNet2DConditionModel(**{**SD2_BASE, **sd15})
        clip = transformers.CLIPModel(
            transformers.CLIPConfig(
                text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12),
                vision_config=dict(hidden_size=1024, intermediate_size=4096,
                                   num_hidden_layers=24, num_attention_heads=16, patch_size=14),
                projection_dim=768,
            )
        )  # fmt: skip
    position_net = sum(p.numel() for p in unet.position_net.parameters())
    assert parts["unet"] == sum(p.numel() for p in unet.parameters()) - position_net
    towers = {n: sum(p.numel() for p in getattr(clip, n).parameters()) for n in
              ("text_model", "vision_model", "visual_projection")}  # fmt: skip
    assert parts["text_encoder"] == towers["text_model"]
    assert parts["image_encoder"] == towers["vision_model"] + towers["visual_projection"]
