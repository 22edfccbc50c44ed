"""Noise schedules and the forward-process equations of DDPM (Ho et al. 2020).

A `Schedule` holds the per-training-timestep tables `betas` and `alphas_cumprod`
(ᾱ_t = prod_{s<=t} (1 - β_s)), both `[T]` float32, plus the discrete settings of the
diffusers `scheduler_config.json` it was read from. The tables are computed in float64
and rounded once to float32, as the original latent-diffusion code does; diffusers
computes them in float32 torch, which differs by at most one float32 rounding step
(|Δᾱ| <= 5e-7, tested in tests/test_schedules.py).

`Schedule` is a pytree: the two tables are its leaves (traced when passed to a jitted
function, so a new schedule with the same settings does not recompile) and the ints and
strings are static metadata (they decide shapes and code paths). It cannot be a static
jit argument itself because arrays are not hashable.

Shapes: `t` is an int32 array `[B]` (or a scalar); `x` is `[B, ...]` of any rank (NHWC
images); per-timestep coefficients are gathered and broadcast over the trailing axes.
Math runs in float32 (the tables' dtype).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@jax.tree_util.register_dataclass
@dataclass(frozen=True, eq=False)  # equality of array fields has no single truth value
class Schedule:
    """β_t and ᾱ_t tables `[T]` float32 and how the model and the sampler read them.

    `steps_offset`, `timestep_spacing` and `set_alpha_to_one` choose the inference
    timesteps and DDIM's last ᾱ_prev exactly as diffusers' `DDIMScheduler` does; the
    defaults are Stable Diffusion's.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    num_train_timesteps: int = dataclasses.field(default=1000, metadata={"static": True})
    prediction_type: str = dataclasses.field(default="epsilon", metadata={"static": True})
    steps_offset: int = dataclasses.field(default=1, metadata={"static": True})
    timestep_spacing: str = dataclasses.field(default="leading", metadata={"static": True})
    set_alpha_to_one: bool = dataclasses.field(default=False, metadata={"static": True})

    @classmethod
    def from_diffusers(cls, config: Mapping) -> Schedule:
        """A diffusers scheduler_config.json dict, read with `DDIMScheduler`'s defaults.

        Options of other scheduler classes (PNDM's `skip_prk_steps`, ...) are ignored: they
        describe those samplers, not the noise schedule. Options that would change DDIM's
        math away from what we implement are rejected by name.
        """
        options = {**_DDIM_DEFAULTS, **config}
        for key, supported in _FIXED.items():
            if options[key] != supported:
                raise UserError(f"scheduler config: unsupported {key}={options[key]!r}")
        return make_schedule(
            options["beta_schedule"],
            beta_start=options["beta_start"],
            beta_end=options["beta_end"],
            num_train_timesteps=options["num_train_timesteps"],
            prediction_type=options["prediction_type"],
            steps_offset=options["steps_offset"],
            timestep_spacing=options["timestep_spacing"],
            set_alpha_to_one=options["set_alpha_to_one"],
        )


# DDIMScheduler's defaults: what diffusers uses for a key the config file leaves out.
_DDIM_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "timestep_spacing": "leading",
    "set_alpha_to_one": True,
    "clip_sample": True,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "trained_betas": None,
}
# DDIM options we implement only at these values (Stable Diffusion's).
_FIXED = {
    "clip_sample": False,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "trained_betas": None,
}


def linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> np.ndarray:
    """β_t evenly spaced from beta_start to beta_end (DDPM), float64 `[T]`."""
    return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)


def scaled_linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> np.ndarray:
    """√β_t evenly spaced (latent diffusion / Stable Diffusion), float64 `[T]`."""
    return linear_betas(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps) ** 2


def squaredcos_cap_v2_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021): ᾱ(s) = cos²((s + 0.008) / 1.008 · π/2),
    β_t = 1 - ᾱ((t+1)/T) / ᾱ(t/T) capped at max_beta; float64 `[T]`."""
    s = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    alpha_bar = np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def make_schedule(
    beta_schedule: str = "scaled_linear",
    *,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
    prediction_type: str = "epsilon",
    steps_offset: int = 1,
    timestep_spacing: str = "leading",
    set_alpha_to_one: bool = False,
) -> Schedule:
    """A schedule by diffusers' `beta_schedule` name; the defaults are Stable Diffusion's.

    `squaredcos_cap_v2` ignores beta_start and beta_end, as diffusers does.
    """
    if beta_schedule == "linear":
        betas = linear_betas(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        betas = scaled_linear_betas(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "squaredcos_cap_v2":
        betas = squaredcos_cap_v2_betas(num_train_timesteps)
    else:
        raise UserError(f"scheduler config: unsupported beta_schedule={beta_schedule!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"scheduler config: unsupported prediction_type={prediction_type!r}")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise UserError(f"scheduler config: unsupported timestep_spacing={timestep_spacing!r}")
    return Schedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas_cumprod=jnp.asarray(np.cumprod(1 - betas), jnp.float32),
        num_train_timesteps=num_train_timesteps,
        prediction_type=prediction_type,
        steps_offset=steps_offset,
        timestep_spacing=timestep_spacing,
        set_alpha_to_one=set_alpha_to_one,
    )


def per_example(values: jax.Array, ndim: int) -> jax.Array:
    """`[B]` -> `[B, 1, ..., 1]` of rank `ndim`, to broadcast over a `[B, ...]` batch."""
    return jnp.reshape(values, jnp.shape(values) + (1,) * (ndim - jnp.ndim(values)))


def _signal_and_noise_scales(schedule: Schedule, t: jax.Array, ndim: int):
    """(√ᾱ_t, √(1-ᾱ_t)), each broadcastable against a rank-`ndim` batch."""
    alpha_bar = per_example(schedule.alphas_cumprod[t], ndim)
    return jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward process sample: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε."""
    signal, sigma = _signal_and_noise_scales(schedule, t, x0.ndim)
    return signal * x0 + sigma * noise


def velocity(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v-prediction target (Salimans & Ho 2022): v = √ᾱ_t ε - √(1-ᾱ_t) x_0."""
    signal, sigma = _signal_and_noise_scales(schedule, t, x0.ndim)
    return signal * noise - sigma * x0


def predict_x0_and_eps(
    schedule: Schedule, x_t: jax.Array, model_output: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(x̂_0, ε̂) from the model's output at x_t, by the schedule's prediction type.

    epsilon:      x̂_0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t
    v_prediction: x̂_0 = √ᾱ_t x_t - √(1-ᾱ_t) v,   ε̂ = √ᾱ_t v + √(1-ᾱ_t) x_t
    """
    signal, sigma = _signal_and_noise_scales(schedule, t, x_t.ndim)
    if schedule.prediction_type == "epsilon":
        return (x_t - sigma * model_output) / signal, model_output
    return signal * x_t - sigma * model_output, signal * model_output + sigma * x_t
