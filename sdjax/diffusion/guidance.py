"""Classifier-free guidance with a text scale and an image scale (docs/method.md §6).

Three branches are evaluated in one batched model call:
[text + subjects | empty text + subjects | empty text, no location mask, null subjects],

    eps = eps_u + s_T (eps_t - eps_i) + s_I (eps_i - eps_u)

With s_I = 1 this is ordinary CFG on the text given the subjects; when the subject branch
equals the unconditional one (eps_i = eps_u) it is ordinary text CFG.
"""

from __future__ import annotations

import jax.numpy as jnp


def three_branch_guidance(eps_text, eps_image, eps_uncond, text_scale, image_scale):
    """Combine the three branch outputs (each `[B, ...]`) into the guided output."""
    return eps_uncond + text_scale * (eps_text - eps_image) + image_scale * (eps_image - eps_uncond)


def stack_branches(*branches):
    """Concatenate per-branch inputs `[B, ...]` into one batch `[count*B, ...]`."""
    return jnp.concatenate(branches, axis=0)


def split_branches(output, count: int = 3):
    """A batched output `[count*B, ...]` back into its branches."""
    return jnp.split(output, count, axis=0)
