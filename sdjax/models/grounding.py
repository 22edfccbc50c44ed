"""Subject conditioning from the image encoder: GroundingNet (adapter tokens) and the CLS MLP.

GroundingNet (docs/method.md §3b) fuses each subject's patch tokens with its box:

    pos  = Fourier(box)                 box xyxy in [0, 1] -> 64 (8 freqs x sin/cos x 4)
    objs = MLP([patch_tokens, pos])     per token: LN -> Linear -> GELU -> Linear

patches `[B, N, P, D_patch]`, boxes `[B, N, 4]`, valid / use_box `[B, N]` ->
objs `[B, N*P, D_out]`. Empty slots (valid False) use learned null patch and position
features; a slot without box coordinates (use_box False) uses the null position features.

The CLS MLP (docs/method.md §3c) maps a subject's projected CLS embedding `[B, N, D_img]` to a text
token embedding `[B, N, D_text]` that replaces the subject's placeholder token.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sdjax.models.layers import dense, layer_norm, partitioned

NUM_FREQS = 8
BOX_DIM = NUM_FREQS * 2 * 4


def fourier_box_embedding(boxes, num_freqs: int = NUM_FREQS, temperature: float = 100.0):
    """boxes `[..., 4]` -> `[..., num_freqs*8]`: [sin(f0 xyxy), cos(f0 xyxy), sin(f1 xyxy), ...]

    with f_k = temperature**(k / num_freqs) (no 2*pi), as GLIGEN's Fourier embedder.
    """
    freqs = temperature ** (jnp.arange(num_freqs, dtype=jnp.float32) / num_freqs)
    args = freqs[:, None] * boxes[..., None, :].astype(jnp.float32)  # [..., F, 4]
    emb = jnp.stack([jnp.sin(args), jnp.cos(args)], axis=-2)  # [..., F, 2, 4]
    return emb.reshape(*boxes.shape[:-1], num_freqs * 2 * 4)


class ProjectionMLP(nn.Module):
    """LN -> Linear(D_in, hidden) -> GELU (exact) -> Linear(hidden, out)."""

    hidden: int
    out: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = layer_norm(1e-5, name="norm")(x)
        x = dense(self.hidden, ("embed", "mlp"), name="linear_1", dtype=self.dtype)(x)
        x = nn.gelu(x, approximate=False)
        return dense(self.out, ("mlp", "embed"), name="linear_2", dtype=self.dtype)(x)


class GroundingNet(nn.Module):
    out_dim: int = 1024
    hidden_dim: int = 1024
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, patches, boxes, valid, use_box=None):
        b, n, p, d = patches.shape
        zeros = partitioned(nn.initializers.zeros_init(), (None, None))
        null_patch = self.param("null_patch_feature", zeros, (p, d))
        null_position = self.param("null_position_feature", zeros, (p, BOX_DIM))
        use_box = valid if use_box is None else valid & use_box
        patches = jnp.where(valid[..., None, None], patches, null_patch)
        position = jnp.broadcast_to(fourier_box_embedding(boxes)[:, :, None], (b, n, p, BOX_DIM))
        position = jnp.where(use_box[..., None, None], position, null_position)
        tokens = jnp.concatenate([patches.astype(jnp.float32), position], axis=-1)
        objs = ProjectionMLP(self.hidden_dim, self.out_dim, self.dtype, name="mlp")(tokens)
        return objs.reshape(b, n * p, self.out_dim)


class ClsMLP(nn.Module):
    """Projected CLS `[B, N, D_img]` -> placeholder token embedding `[B, N, out_dim]`."""

    out_dim: int = 1024
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, cls_embeds):
        return ProjectionMLP(self.out_dim, self.out_dim, self.dtype, name="mlp")(cls_embeds)
