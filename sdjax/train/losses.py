"""Subject-Diffusion's objective (docs/method.md §3d, §4):

    L = ||target - model(z_t, t, y, x_s, l, l_m)||^2 + lambda_attn * L_attn

target = epsilon (or v). L_attn acts on the cross-attention probabilities A `[B, HW, K]`
of the probed UNet layers at each subject's placeholder and label tokens (K = 2N:
the N placeholders, then the N labels), against the subject's mask M resized to the
layer's resolution:

  balanced_l1 (the authors' code, from FastComposer), per token:
      mean_{p outside M} A_p  -  mean_{p inside M} A_p
  l1 (the paper's equation), per token:
      mean_p |A_p - M_p|

Token losses are averaged over valid subjects (present, text not dropped) and the batch,
then over layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sdjax.diffusion.schedules import Schedule, velocity

ATTENTION_FORMS = ("balanced_l1", "l1")


def diffusion_loss(schedule: Schedule, output, x0, noise, t):
    """Mean squared error against epsilon or v (per the schedule's prediction type)."""
    if schedule.prediction_type == "v_prediction":
        target = velocity(schedule, x0, noise, t)
    else:
        target = noise
    return jnp.mean(jnp.square(output.astype(jnp.float32) - target))


def resize_masks(masks, size: int):
    """Subject masks `[B, N, M, M]` -> `[B, N, size, size]` (bilinear, antialiased)."""
    b, n = masks.shape[:2]
    return jax.image.resize(masks, (b, n, size, size), method="linear", antialias=True)


def token_losses(probs, masks, form: str):
    """One layer: probs `[B, HW, K]`, masks `[B, N, M, M]` (K = 2N) -> `[B, K]`."""
    b, hw, k = probs.shape
    size = int(round(hw**0.5))
    target = resize_masks(masks, size).reshape(b, -1, hw)
    target = jnp.concatenate([target] * (k // target.shape[1]), axis=1)  # [B, K, HW]
    attn = jnp.swapaxes(probs, 1, 2)  # [B, K, HW]
    if form == "l1":
        return jnp.mean(jnp.abs(attn - target), axis=-1)
    outside = 1.0 - target
    mean_out = jnp.sum(attn * outside, -1) / jnp.maximum(jnp.sum(outside, -1), 1e-6)
    mean_in = jnp.sum(attn * target, -1) / jnp.maximum(jnp.sum(target, -1), 1e-6)
    return mean_out - mean_in


def attention_map_loss(layer_probs, masks, valid, form: str = "balanced_l1"):
    """L_attn over probed layers: list of `[B, HW, K]`, masks `[B, N, M, M]`, valid `[B, N]`."""
    if form not in ATTENTION_FORMS:
        raise ValueError(f"attention loss form {form!r}; known: {ATTENTION_FORMS}")
    weights = jnp.concatenate([valid, valid], axis=1).astype(jnp.float32)  # [B, K]
    per_layer = [
        jnp.sum(token_losses(p, masks, form) * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        for p in layer_probs
    ]
    return jnp.mean(jnp.stack(per_layer))
