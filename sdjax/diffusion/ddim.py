"""DDIM sampling (Song et al. 2021, eq. 12 and 16), step for step as diffusers' `DDIMScheduler`.

The whole denoising loop is one `lax.fori_loop`, so a sampler traces its model once and
compiles once per `num_steps`. Settings follow the `Schedule` (Stable Diffusion's by
default: leading spacing, steps_offset 1, set_alpha_to_one False) and, like
`DDIMScheduler` with `clip_sample=False`, x̂_0 is never clipped.

Shapes: x is `[B, ...]` (NHWC latents); the model is called as `eps_fn(x, t)` with `t` an
int32 `[B]` array holding the current timestep; it returns its raw output (ε or v, as
the schedule's prediction_type says), shaped like x. The loop carries x in float32
(float64 if x_T is).

Stochastic sampling (eta > 0) draws the noise of step i (0 = first, noisiest step) as
`step_noise(rng, i, x.shape, x.dtype)`: normal noise from `jax.random.fold_in(rng, i)`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sdjax.diffusion.schedules import (
    TIMESTEP_SPACINGS,
    Schedule,
    make_schedule,
    per_example,
    predict_x0_and_eps,
)
from sdjax.errors import UserError


def timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    steps_offset: int = 1,
    spacing: str = "leading",
) -> np.ndarray:
    """The `num_steps` inference timesteps, descending, int32, as `DDIMScheduler.set_timesteps`.

    leading:  t_i = i · (T // n) + steps_offset (the only spacing that uses the offset)
    trailing: t_i = round(T - i · T / n) - 1
    linspace: n values rounded from the evenly spaced [0, T - 1]
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise UserError(f"num_steps={num_steps} must be in 1..{num_train_timesteps}")
    if spacing == "leading":
        ts = np.arange(num_steps)[::-1] * (num_train_timesteps // num_steps) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1]
    else:
        raise UserError(f"timestep spacing {spacing!r} is not one of {TIMESTEP_SPACINGS}")
    if ts.max() >= num_train_timesteps:
        raise UserError(
            f"num_steps={num_steps} with steps_offset={steps_offset} reaches timestep "
            f"{int(ts.max())}, past the last trained timestep {num_train_timesteps - 1}"
        )
    return ts.astype(np.int32)


def step_noise(rng: jax.Array, i: jax.Array | int, shape, dtype=jnp.float32) -> jax.Array:
    """The normal noise that stochastic DDIM adds at step i (0 = the first, noisiest step)."""
    return jax.random.normal(jax.random.fold_in(rng, i), shape, dtype)


def _alpha_bar_prev(schedule: Schedule, t_prev: jax.Array) -> jax.Array:
    """ᾱ at the previous timestep; before timestep 0 (t_prev < 0) it is 1 or ᾱ_0,
    as `set_alpha_to_one` says."""
    final = 1.0 if schedule.set_alpha_to_one else schedule.alphas_cumprod[0]
    return jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], final)


def _adds_noise(eta) -> bool:
    """Whether eta may be non-zero (a traced eta may be)."""
    return not (isinstance(eta, int | float) and eta == 0)


def ddim_step(
    schedule: Schedule,
    x_t: jax.Array,
    model_output: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    eta: float | jax.Array = 0.0,
    noise: jax.Array | None = None,
) -> jax.Array:
    """x_{t_prev} from x_t and the model's output at t (`t`, `t_prev`: int32 `[B]` or scalars).

    x_prev = √ᾱ_prev x̂_0 + √(1 - ᾱ_prev - σ²) ε̂ + σ z,
    σ = eta · √((1 - ᾱ_prev) / (1 - ᾱ_t) · (1 - ᾱ_t / ᾱ_prev)),  z = `noise`.
    `noise` is required when eta may be non-zero.
    """
    if noise is None and _adds_noise(eta):
        raise ValueError(f"ddim_step with eta={eta} adds noise: pass `noise`")
    x0, eps = predict_x0_and_eps(schedule, x_t, model_output, t)
    alpha_bar = per_example(schedule.alphas_cumprod[t], x_t.ndim)
    alpha_bar_prev = per_example(_alpha_bar_prev(schedule, t_prev), x_t.ndim)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
    sigma = eta * jnp.sqrt(variance)
    x_prev = jnp.sqrt(alpha_bar_prev) * x0 + jnp.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    return x_prev if noise is None else x_prev + sigma * noise


def sample_loop_indexed(
    eps_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    x_T: jax.Array,
    *,
    num_steps: int,
    eta: float | jax.Array = 0.0,
    rng: jax.Array | None = None,
    schedule: Schedule | None = None,
) -> jax.Array:
    """`sample_loop` whose model also gets the step index: `eps_fn(x, t, i)`, i an int32
    scalar, 0 at the first (noisiest) step, num_steps - 1 at the last.

    For conditioning that changes part-way through sampling, e.g. text-image interpolation:
    `jnp.where(i < switch_step, eps_with_image, eps_text_only)` or `lax.cond` on i.
    """
    schedule = make_schedule() if schedule is None else schedule
    noisy = _adds_noise(eta)
    if noisy and rng is None:
        raise ValueError(f"eta={eta} adds noise at every step: pass `rng`")
    ts = timesteps(
        num_steps,
        schedule.num_train_timesteps,
        schedule.steps_offset,
        schedule.timestep_spacing,
    )
    # DDIMScheduler steps back by T // n whatever the spacing; for 'leading' that is the
    # next timestep, for the others (when n does not divide T) it is diffusers' choice.
    t_prevs = jnp.asarray(ts - schedule.num_train_timesteps // num_steps)
    ts = jnp.asarray(ts)
    batch = x_T.shape[0]

    def step(i, x):
        t = jnp.full((batch,), ts[i], jnp.int32)
        t_prev = jnp.full((batch,), t_prevs[i], jnp.int32)
        noise = step_noise(rng, i, x.shape, x.dtype) if noisy else None
        return ddim_step(schedule, x, eps_fn(x, t, i), t, t_prev, eta, noise)

    # Scheduler math stays in (at least) float32 whatever the dtype of x_T.
    x_T = x_T.astype(jnp.promote_types(x_T.dtype, jnp.float32))
    return lax.fori_loop(0, num_steps, step, x_T)


def sample_loop(
    eps_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_T: jax.Array,
    *,
    num_steps: int,
    eta: float | jax.Array = 0.0,
    rng: jax.Array | None = None,
    schedule: Schedule | None = None,
) -> jax.Array:
    """Denoise x_T `[B, ...]` (pure noise) in `num_steps` DDIM steps; returns x_0 `[B, ...]`.

    `eps_fn(x, t) -> model output`, t int32 `[B]`. eta 0 is deterministic DDIM; eta > 0
    (a Python number or a traced scalar) needs `rng`, split per step by `step_noise`.
    Traceable inside one `jax.jit` with `num_steps` static.
    """
    return sample_loop_indexed(
        lambda x, t, i: eps_fn(x, t),
        x_T,
        num_steps=num_steps,
        eta=eta,
        rng=rng,
        schedule=schedule,
    )
