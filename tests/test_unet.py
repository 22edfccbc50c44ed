"""UNet parity with diffusers' UNet2DConditionModel (tiny random weights, real file format)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from flax import traverse_util
from flax.linen import meta
from parity import assert_parity, nchw, nhwc, random_params, randomise_

from sdjax.convert.unet import abstract_unet, extend_unet, unet_from_diffusers, unet_to_diffusers
from sdjax.models.adapter import GatedSelfAttention
from sdjax.models.unet import UNet
from sdjax.models.unet_config import UNetConfig

SD1_STYLE = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=12,
    attention_head_dim=2,
    norm_num_groups=4,
)
SD2_STYLE = dict(
    sample_size=8,
    in_channels=5,
    out_channels=4,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=12,
    attention_head_dim=[1, 2, 2],
    use_linear_projection=True,
    norm_num_groups=4,
    attention_type="gated",
)
PROBED = ("down_blocks_1", "mid_block", "up_blocks_1")


class PassObjs(torch.nn.Module):
    """Stands in for diffusers' GLIGEN position_net: the objs are given directly."""

    def forward(self, objs):
        return objs


def reference(config, tmp_path, seed=0):
    model = randomise_(UNet2DConditionModel(**config), std=0.15, seed=seed).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    model.position_net = PassObjs()
    return model


def inputs(config, batch=2, tokens=5, objs=3, seed=0):
    rng = np.random.default_rng(seed)
    size = config["sample_size"]
    return (
        rng.standard_normal((batch, size, size, config["in_channels"])).astype(np.float32),
        np.array([10, 900][:batch], np.int32),
        rng.standard_normal((batch, tokens, config["cross_attention_dim"])).astype(np.float32),
        rng.standard_normal((batch, objs, config["cross_attention_dim"])).astype(np.float32),
    )


def run_reference(model, x, t, ctx, objs=None):
    kwargs = (
        {"cross_attention_kwargs": {"gligen": {"objs": torch.from_numpy(objs)}}}
        if (objs is not None)
        else {}
    )
    with torch.no_grad():
        out = model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), **kwargs).sample
    return nhwc(out)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd2_unet")
    ref = reference(SD2_STYLE, path)
    config, params = unet_from_diffusers(str(path))
    return ref, config, params, path


def test_sd1_style_parity(tmp_path):
    ref = reference(SD1_STYLE, tmp_path)
    config, params = unet_from_diffusers(str(tmp_path))
    assert config.heads == (2, 2) and not config.use_linear_projection and not config.adapter
    x, t, ctx, _ = inputs(SD1_STYLE)
    ours = UNet(config).apply({"params": params}, x, t, ctx)
    assert_parity(ours, run_reference(ref, x, t, ctx))


def test_sd2_style_parity_with_adapters(sd2):
    ref, config, params, _ = sd2
    assert config.heads == (1, 2, 2) and config.use_linear_projection and config.adapter
    assert config.in_channels == 5
    x, t, ctx, objs = inputs(SD2_STYLE)
    ours = UNet(config).apply({"params": params}, x, t, ctx, objs)
    assert_parity(ours, run_reference(ref, x, t, ctx, objs))
    # The adapters are live (random nonzero gates): without objs the output differs.
    plain = UNet(config).apply({"params": params}, x, t, ctx)
    assert np.abs(np.asarray(plain) - np.asarray(ours)).max() > 1e-3


def test_probe_matches_reference_attention_maps(sd2):
    ref, config, params, _ = sd2
    config = dataclasses.replace(config, probe_layers=PROBED)
    x, t, ctx, objs = inputs(SD2_STYLE)
    columns = np.array([[1, 3], [0, 4]], np.int32)
    _, state = UNet(config).apply(
        {"params": params}, x, t, ctx, objs, columns, mutable=["attn_probs"]
    )
    ours = {
        ".".join(path[:-1]): np.asarray(v[0])
        for path, v in traverse_util.flatten_dict(state["attn_probs"]).items()
    }
    # up_blocks_1 has two transformers (layers_per_block + 1), the others one each.
    assert len(ours) == 4 and {k.split(".")[0] for k in ours} == set(PROBED)

    captured = {}

    def hook(name):
        def fn(module, args, kwargs, output):
            q = module.head_to_batch_dim(module.to_q(args[0]))
            k = module.head_to_batch_dim(module.to_k(kwargs["encoder_hidden_states"]))
            probs = module.get_attention_scores(q, k)  # [B*heads, T, S]
            probs = probs.reshape(x.shape[0], module.heads, *probs.shape[1:]).mean(1)
            captured[name] = np.take_along_axis(probs.numpy(), columns[:, None, :], axis=-1)

        return fn

    for name in ours:
        torch_name = name.replace("_blocks_", "_blocks.").replace("attentions_", "attentions.")
        torch_name = torch_name.replace("transformer_blocks_", "transformer_blocks.")
        dict(ref.named_modules())[torch_name].register_forward_hook(hook(name), with_kwargs=True)
    run_reference(ref, x, t, ctx, objs)
    for name, probs in ours.items():
        assert_parity(probs, captured[name])
        assert probs.shape == (2, captured[name].shape[1], 2)


def test_export_round_trip(sd2, tmp_path):
    _, config, params, _ = sd2
    unet_to_diffusers(config, params, str(tmp_path))
    exported = UNet2DConditionModel.from_pretrained(str(tmp_path)).eval()
    exported.position_net = PassObjs()
    x, t, ctx, objs = inputs(SD2_STYLE, seed=1)
    ours = UNet(config).apply({"params": params}, x, t, ctx, objs)
    assert_parity(run_reference(exported, x, t, ctx, objs), ours, tol=1e-5)
    config2, params2 = unet_from_diffusers(str(tmp_path))
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_extend_plain_unet_keeps_its_output(tmp_path):
    ref = reference(SD1_STYLE, tmp_path)
    config, params = unet_from_diffusers(str(tmp_path))
    new_config, new_params = extend_unet(
        config, params, in_channels=5, adapter=True, rng=jax.random.key(0)
    )
    x, t, ctx, _ = inputs(SD1_STYLE)
    objs = np.random.default_rng(3).standard_normal((2, 3, 12)).astype(np.float32)
    x5 = np.concatenate([x, np.zeros_like(x[..., :1])], axis=-1)
    out = UNet(new_config).apply({"params": new_params}, x5, t, ctx, objs)
    assert_parity(out, run_reference(ref, x, t, ctx))
    # The location channel is live once its weights move away from zero.
    x5[..., -1] = 1.0
    new_params["conv_in"]["kernel"][..., -1, :] = 0.5
    moved = UNet(new_config).apply({"params": new_params}, x5, t, ctx, objs)
    assert np.abs(np.asarray(moved) - np.asarray(out)).max() > 1e-3


def test_fresh_adapter_is_the_identity():
    objs = np.random.default_rng(0).standard_normal((2, 3, 12)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((2, 6, 8)).astype(np.float32)
    adapter = GatedSelfAttention(heads=2, head_dim=4)
    params = meta.unbox(adapter.init(jax.random.key(0), x, objs))["params"]
    assert params["alpha_attn"] == 0 and params["alpha_dense"] == 0
    np.testing.assert_array_equal(adapter.apply({"params": params}, x, objs), x)


def test_zero_gates_make_objs_irrelevant_and_remat_is_the_same_function():
    config = UNetConfig.from_diffusers(SD2_STYLE)
    params = random_params(abstract_unet(config), seed=1)
    x, t, ctx, objs = inputs(SD2_STYLE)

    def loss(p, c):
        return jnp.sum(UNet(c).apply({"params": p}, x, t, ctx, objs) ** 2)

    remat = dataclasses.replace(config, remat=True)
    g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, config)
    g2 = jax.jit(jax.grad(loss), static_argnums=1)(params, remat)
    jax.tree.map(assert_parity, g2, g1)

    closed = jax.tree_util.tree_map_with_path(
        lambda path, v: np.zeros_like(v) if "alpha" in str(path[-1]) else v, params
    )
    forward = jax.jit(lambda p, o: UNet(config).apply({"params": p}, x, t, ctx, o))
    np.testing.assert_array_equal(forward(closed, objs), forward(closed, objs * 0 + 3))
