"""Parameter counts of the paper-size model (SPEC 3): the SD 2-base UNet with the location
channel and adapters, and GroundingNet, against closed-form counts and against diffusers'
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
SD2_BASE = dict(
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
    assert adapters == expected_adapters == 211_213_152  # SPEC: ~211M
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
