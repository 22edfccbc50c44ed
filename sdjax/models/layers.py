"""Layers every model is built from: Dense, Conv and norms that carry logical axis names.

Parameters are float32 (master weights); `dtype` is the compute dtype of matmuls and
convolutions. Norms always compute in float32.

Logical axis names (a config's sharding rules map them onto mesh axes):
  parameters   'embed' (a transformer's width; 'embed_out' on the output side of a square
               width -> width map, since one array cannot name an axis twice), 'mlp'
               (feed-forward hidden width),
               'heads' (attention projection width, heads * head_dim), 'conv_in' /
               'conv_out' (convolution channels), 'vocab' (embedding rows), 'norm'.
  activations  'batch', 'length', 'height', 'width', 'embed' / 'channels'.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Axes = tuple[str | None, ...]


def partitioned(init, axes: Axes):
    return nn.with_logical_partitioning(init, axes)


def unbox(tree):
    """Parameters without their logical-axis boxes. Unlike `flax.linen.meta.unbox` this
    adds no sharding constraint, so it also works on abstract trees inside a mesh."""
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def dense(
    features: int,
    axes: Axes = ("embed", "mlp"),
    *,
    name: str,
    use_bias: bool = True,
    dtype=jnp.float32,
) -> nn.Dense:
    """A linear layer `y = x W + b`, W `[in, out]` (PyTorch stores `[out, in]`)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(nn.initializers.lecun_normal(), axes),
        bias_init=partitioned(nn.initializers.zeros_init(), axes[-1:]),
        name=name,
    )


def conv(
    features: int,
    kernel: int = 3,
    *,
    name: str,
    stride: int = 1,
    padding: int | None = None,
    use_bias: bool = True,
    dtype=jnp.float32,
    kernel_init=None,
) -> nn.Conv:
    """A 2-D convolution on NHWC with PyTorch's symmetric padding (default `kernel // 2`)."""
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(
            kernel_init or nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")
        ),
        bias_init=partitioned(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


def embedding(num: int, features: int, axes: Axes, *, name: str) -> nn.Embed:
    """A float32 lookup table `[num, features]` (PyTorch `nn.Embedding`, same layout)."""
    return nn.Embed(
        num,
        features,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        embedding_init=partitioned(nn.initializers.normal(0.02), axes),
        name=name,
    )


class GroupNorm(nn.Module):
    """PyTorch's GroupNorm over the channel (last) axis of `[B, ..., C]`, in float32, with
    its exact two-pass variance: y = (x - mean_g) / sqrt(var_g + eps) * scale + bias.

    The statistics are summed per channel over all positions first (a reduction that
    runs vectorised across the channels), then over each group's channels: on CPU this is
    3-4x faster than reducing a `[B, P, G, C/G]` view, as `flax.linen.GroupNorm` does
    (BENCHMARKS.md, "Performance work").
    """

    groups: int
    eps: float

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.groups:
            raise ValueError(f"{c} channels do not split into {self.groups} groups")
        scale = self.param("scale", partitioned(nn.initializers.ones_init(), ("norm",)), (c,))
        bias = self.param("bias", partitioned(nn.initializers.zeros_init(), ("norm",)), (c,))
        b, width = x.shape[0], c // self.groups
        tokens = x.astype(jnp.float32).reshape(b, -1, c)
        count = tokens.shape[1] * width

        def group_mean(v):  # [B, P, C] -> [B, 1, C]: every channel gets its group's mean
            sums = v.sum(axis=1).reshape(b, self.groups, width).sum(axis=-1)
            return jnp.repeat(sums / count, width, axis=-1)[:, None, :]

        centred = tokens - group_mean(tokens)
        inv_std = jax.lax.rsqrt(group_mean(centred * centred) + self.eps)
        return (centred * inv_std * scale + bias).reshape(x.shape)


def layer_norm(eps: float, *, name: str) -> nn.LayerNorm:
    """LayerNorm over the last axis in float32 with PyTorch's exact variance."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def constrain(x, axes: Sequence[str | None]):
    """Sharding hint on an activation; a no-op outside a mesh with logical axis rules."""
    return nn.with_logical_constraint(x, tuple(axes))


def activation(name: str):
    """PyTorch activation names as JAX functions (exact GELU unless asked for tanh)."""
    table = {
        "silu": nn.silu,
        "swish": nn.silu,
        "gelu": lambda x: nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(table)}")
    return table[name]
