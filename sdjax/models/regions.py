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
Each attention layer sees the regions on its own grid (`region_cells`).
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


def adapter_mask(regions: Regions, height: int, width: int, num_objs: int):
    """bool `[B, 1, T+O, T+O]` for the gated self-attention over [visual (T = height*width),
    objects (O = N*P, subject k's P tokens in a row)]: visual queries see every visual key
    and the object keys of their own subjects; object queries (discarded) see all."""
    cells = region_cells(regions.masks, height, width)  # [B, N, T]
    b, n, t = cells.shape
    per_subject = num_objs // n
    seen = cells | ~regions.objs[:, :, None]  # [B, N, T]
    objs_seen = jnp.repeat(jnp.swapaxes(seen, 1, 2), per_subject, axis=2)  # [B, T, O]
    visual_rows = jnp.concatenate([jnp.ones((b, t, t), bool), objs_seen], axis=2)
    object_rows = jnp.ones((b, num_objs, t + num_objs), bool)
    return jnp.concatenate([visual_rows, object_rows], axis=1)[:, None]


def cross_mask(regions: Regions, height: int, width: int):
    """bool `[B, 1, T, L]`: visual position p sees text token l unless l belongs to a
    subject whose region does not cover p."""
    cells = region_cells(regions.masks, height, width)  # [B, N, T]
    owner = regions.tokens  # [B, L]
    inside = jnp.take_along_axis(
        jnp.swapaxes(cells, 1, 2), jnp.maximum(owner, 0)[:, None, :], axis=2
    )  # [B, T, L]: is p in the region of token l's subject
    return (inside | (owner < 0)[:, None, :])[:, None]
