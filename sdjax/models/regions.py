"""Region-bound attention (beyond the paper): each subject's tokens are seen only in its region.

Several subjects leak into each other when every image position attends to every
subject's tokens. With `ModelConfig.region_attention`, a visual position attends

- in the adapters' gated self-attention: to all visual tokens, and to the grounding tokens
  of the subjects whose region covers it (unbound slots: everywhere);
- in cross-attention: to every text token except the placeholder and label tokens of
  subjects whose region does not cover it.

`Regions` carries what the UNet needs, at the latent resolution m:
  masks  float `[B, N, m, m]` in [0, 1]: subject k's region (training: its segmentation
         mask; sampling: its box, or its reference mask fitted into the box);
  objs   bool `[B, N]`: subject k's grounding tokens are bound to its region (False for
         empty or dropped slots, whose null tokens stay visible everywhere);
  tokens int32 `[B, L]`: the subject a text token belongs to, -1 for none.
Each attention layer sees the regions on its own grid (`region_cells`), as a factored
mask that the fused attention kernels take without a mask tensor (`sdjax.models.kernels`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


class Regions(NamedTuple):
    masks: jnp.ndarray  # float [B, N, m, m]
    objs: jnp.ndarray  # bool [B, N]
    tokens: jnp.ndarray  # int32 [B, L]


def token_subjects(placeholders, label_positions, valid, length: int):
    """int32 `[B, L]`: k at subject k's placeholder and label positions (`[B, N]` each)
    where `valid` `[B, N]`, -1 elsewhere."""
    positions = jnp.concatenate([placeholders, label_positions], axis=1)  # [B, 2N]
    n = placeholders.shape[1]
    owner = jnp.concatenate([jnp.arange(n), jnp.arange(n)])  # [2N]
    hit = (jnp.arange(length)[None, None, :] == positions[:, :, None]) & jnp.concatenate(
        [valid, valid], axis=1
    )[:, :, None]  # [B, 2N, L]
    return jnp.max(jnp.where(hit, owner[None, :, None], -1), axis=1).astype(jnp.int32)


def region_cells(masks, height: int, width: int):
    """bool `[B, N, height*width]`: a cell of the attention grid is inside a region when
    any latent pixel it covers is at least half inside. masks `[B, N, m, m]`; the grid
    must divide the latent size (as a UNet's levels do)."""
    b, n, mh, mw = masks.shape
    if mh % height or mw % width:
        raise ValueError(f"a {height}x{width} attention grid does not divide {mh}x{mw} regions")
    blocks = masks.reshape(b, n, height, mh // height, width, mw // width)
    return (blocks.max(axis=(3, 5)) >= 0.5).reshape(b, n, height * width)


def adapter_factors(regions: Regions, height: int, width: int, num_objs: int):
    """The gated self-attention's factored mask (`sdjax.models.kernels`) over [visual (T =
    height*width), objects (O = N*P, subject k's P tokens in a row)]: blocked `[B, T+O, N]`,
    groups `[B, T+O, N]`. Visual queries see every visual key and the object keys of their
    own subjects (and of unbound slots); object queries (their outputs are discarded) see
    all."""
    cells = region_cells(regions.masks, height, width)  # [B, N, T]
    b, n, t = cells.shape
    outside = jnp.swapaxes(~cells, 1, 2).astype(jnp.float32)  # [B, T, N]
    blocked = jnp.concatenate([outside, jnp.zeros((b, num_objs, n), jnp.float32)], axis=1)
    owner = jnp.repeat(jnp.eye(n, dtype=jnp.float32), num_objs // n, axis=0)  # [O, N]
    bound = owner[None] * regions.objs[:, None, :].astype(jnp.float32)  # [B, O, N]
    groups = jnp.concatenate([jnp.zeros((b, t, n), jnp.float32), bound], axis=1)
    return blocked, groups


def cross_factors(regions: Regions, height: int, width: int):
    """The cross-attention's factored mask: blocked `[B, T, N]` (position t is outside
    subject k's region), groups `[B, L, N]` (text token l is subject k's)."""
    cells = region_cells(regions.masks, height, width)  # [B, N, T]
    n = cells.shape[1]
    outside = jnp.swapaxes(~cells, 1, 2).astype(jnp.float32)
    owner = (regions.tokens[:, :, None] == jnp.arange(n)[None, None, :]).astype(jnp.float32)
    return outside, owner
