"""DDIM sampling against a Python loop over diffusers' DDIMScheduler (SD 2-base settings)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from parity import relative_error

from sdjax.diffusion.ddim import (
    ddim_step,
    sample_loop,
    sample_loop_indexed,
    step_noise,
    timesteps,
)
from sdjax.diffusion.schedules import make_schedule, per_example
from sdjax.errors import UserError

SD2_BASE = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    set_alpha_to_one=False,
    clip_sample=False,
    timestep_spacing="leading",
)
SHAPE = (2, 8, 8, 4)
X_T = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
# The noise scheme (fold_in per step) is the same for every key type; threefry's normal
# takes ~5 s to compile on a CPU, rbg's 0.4 s.
RNG = jax.random.key(1, impl="rbg")
TOL = 1e-5


def model_jax(x, t):
    """An analytic stand-in for the UNet: smooth in x, depends on t."""
    return jnp.sin(x) * per_example(t.astype(x.dtype) / 1000, x.ndim) + 0.1 * x


def model_torch(x, t):
    return torch.sin(x) * (t.to(x.dtype) / 1000) + 0.1 * x


def diffusers_scheduler(prediction_type="epsilon", steps_offset=1, **overrides):
    config = {**SD2_BASE, **overrides}
    return DDIMScheduler(**config, prediction_type=prediction_type, steps_offset=steps_offset)


noise_at = jax.jit(step_noise, static_argnums=(2, 3))


def diffusers_sample(scheduler, x_T, num_steps, eta, dtype=torch.float32):
    """A Python loop over `scheduler.step`, fed the noise `sample_loop` draws with RNG."""
    scheduler.set_timesteps(num_steps)
    x = torch.tensor(np.asarray(x_T), dtype=dtype)
    for i, t in enumerate(scheduler.timesteps):
        noise = torch.tensor(np.asarray(noise_at(RNG, i, SHAPE, x_T.dtype))) if eta else None
        x = scheduler.step(model_torch(x, t), t, x, eta=eta, variance_noise=noise).prev_sample
    return x.numpy()


# One compile per (num_steps, prediction type, dtype): schedule tables and eta are traced.
@functools.partial(jax.jit, static_argnames="num_steps")
def sample(x_T, schedule, eta, rng, *, num_steps):
    return sample_loop(model_jax, x_T, num_steps=num_steps, eta=eta, rng=rng, schedule=schedule)


@functools.partial(jax.jit, static_argnames="num_steps")
def sample_deterministic(x_T, schedule, *, num_steps):
    return sample_loop(model_jax, x_T, num_steps=num_steps, schedule=schedule)


def float32_tolerance(num_steps: int) -> float:
    """Max error relative to the output's scale. Each step's float32 rounding differs by a
    few ulps (XLA and torch evaluate sin and fuse multiply-adds differently) and the
    differences add up over the steps, as much as diffusers' own float32 result drifts
    from its float64 one (1000 steps: ~1e-5 of the scale)."""
    return max(2e-6, 4e-8 * num_steps)


# SD's steps_offset=1 makes 1000 leading steps start at t=1000, past the table (diffusers
# raises IndexError, see test_timesteps_past_the_table_are_rejected): 1000 steps use 0.
EVERY_CASE = pytest.mark.parametrize(
    "num_steps, steps_offset, prediction_type, eta",
    [
        (num_steps, steps_offset, prediction_type, eta)
        for num_steps, steps_offset in ((10, 1), (50, 1), (1000, 0))
        for prediction_type in ("epsilon", "v_prediction")
        for eta in (0.0, 1.0)
    ],
)


@EVERY_CASE
def test_sample_loop_is_diffusers_ddim_in_float64(num_steps, steps_offset, prediction_type, eta):
    # The same tables, float64 on both sides: what is compared is the sampling equations
    # and the timestep bookkeeping, which must agree up to float64 rounding.
    scheduler = diffusers_scheduler(prediction_type, steps_offset)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]
    schedule = make_schedule(prediction_type=prediction_type, steps_offset=steps_offset)
    with jax.enable_x64(True):
        schedule = dataclasses.replace(
            schedule, alphas_cumprod=jnp.asarray(scheduler.alphas_cumprod.numpy())
        )
        x_T = jnp.asarray(X_T, jnp.float64)
        ours = sample(x_T, schedule, eta, RNG, num_steps=num_steps)
        ref = diffusers_sample(scheduler, x_T, num_steps, eta, torch.float64)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-10)


@EVERY_CASE
def test_sample_loop_matches_diffusers_in_float32(num_steps, steps_offset, prediction_type, eta):
    schedule = make_schedule(prediction_type=prediction_type, steps_offset=steps_offset)
    ours = sample(X_T, schedule, eta, RNG, num_steps=num_steps)
    ref = diffusers_sample(diffusers_scheduler(prediction_type, steps_offset), X_T, num_steps, eta)
    if eta == 0:
        # With eta 0 the noise is multiplied by zero: both paths agree bit for bit.
        np.testing.assert_array_equal(
            sample_deterministic(X_T, schedule, num_steps=num_steps), ours
        )
    assert relative_error(ours, ref) <= float32_tolerance(num_steps)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_match_diffusers(spacing, steps_offset):
    scheduler = diffusers_scheduler(steps_offset=steps_offset, timestep_spacing=spacing)
    past_the_table = spacing == "leading" and steps_offset > 0  # 1000 steps: rejected below
    for num_steps in range(1, 1001 - past_the_table):
        scheduler.set_timesteps(num_steps)
        ours = timesteps(num_steps, 1000, steps_offset, spacing)
        np.testing.assert_array_equal(ours, scheduler.timesteps.numpy(), err_msg=str(num_steps))
        assert ours.dtype == np.int32


def test_timesteps_past_the_table_are_rejected():
    with pytest.raises(UserError, match="reaches timestep 1000"):
        timesteps(1000, 1000, steps_offset=1)
    scheduler = diffusers_scheduler()
    scheduler.set_timesteps(1000)
    with pytest.raises(IndexError):
        scheduler.step(torch.zeros(1), scheduler.timesteps[0], torch.zeros(1))
    for bad in (0, 1001):
        with pytest.raises(UserError, match="num_steps"):
            timesteps(bad)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_other_spacings_match_diffusers(spacing):
    # 30 does not divide 1000: diffusers' step back of T // n is not the next timestep.
    ours = sample_deterministic(X_T, make_schedule(timestep_spacing=spacing), num_steps=30)
    ref = diffusers_sample(diffusers_scheduler(timestep_spacing=spacing), X_T, 30, 0.0)
    assert relative_error(ours, ref) <= float32_tolerance(30)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_step_per_example_timesteps(set_alpha_to_one):
    # Each example at its own (t, t_prev); a negative t_prev means "past timestep 0".
    t = np.array([981, 1], np.int32)
    t_prev = np.array([961, -19], np.int32)
    schedule = make_schedule(set_alpha_to_one=set_alpha_to_one)
    noise = noise_at(RNG, 0, SHAPE, jnp.float32)
    ours = ddim_step(schedule, X_T, model_jax(X_T, t), t, t_prev, 0.7, noise)
    scheduler = diffusers_scheduler(set_alpha_to_one=set_alpha_to_one)
    scheduler.set_timesteps(50)  # its step back is 1000 // 50 = 20, as t - t_prev above
    x = torch.from_numpy(X_T)
    for b in range(len(t)):
        out = model_torch(x[b], torch.tensor(t[b]))
        noise_b = torch.tensor(np.asarray(noise[b]))
        ref = scheduler.step(out, int(t[b]), x[b], eta=0.7, variance_noise=noise_b).prev_sample
        np.testing.assert_allclose(ours[b], ref.numpy(), rtol=0, atol=TOL)


def test_step_index_follows_timesteps():
    # A model that is off unless i is the index of t in the timestep sequence.
    ts = jnp.asarray(timesteps(10))

    def indexed(x, t, i):
        return model_jax(x, t) + per_example(t - ts[i], x.ndim).astype(x.dtype)

    ours = jax.jit(lambda x: sample_loop_indexed(indexed, x, num_steps=10))(X_T)
    np.testing.assert_array_equal(ours, sample_deterministic(X_T, make_schedule(), num_steps=10))


def test_loop_is_traced_once_and_defaults_to_sd():
    calls = []

    def counting(x, t):
        calls.append((t.shape, t.dtype))
        return model_jax(x, t)

    jax.make_jaxpr(lambda x: sample_loop(counting, x, num_steps=50))(X_T)
    assert calls == [((SHAPE[0],), jnp.int32)]  # one trace of the model, not 50
    default = jax.jit(lambda x: sample_loop(model_jax, x, num_steps=50))(X_T)
    np.testing.assert_array_equal(default, sample_deterministic(X_T, make_schedule(), num_steps=50))


def test_noise_needs_rng():
    with pytest.raises(ValueError, match="rng"):
        sample_loop(model_jax, X_T, num_steps=10, eta=0.5)
    t = jnp.array([21, 21])
    with pytest.raises(ValueError, match="noise"):
        ddim_step(make_schedule(), X_T, X_T, t, t - 20, eta=0.5)
