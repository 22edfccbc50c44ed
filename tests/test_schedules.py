"""Noise schedules and forward-process equations against diffusers' DDPMScheduler."""

import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from sdjax.diffusion.schedules import (
    Schedule,
    add_noise,
    make_schedule,
    predict_x0_and_eps,
    velocity,
)
from sdjax.errors import UserError

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# Stable Diffusion 2-base's scheduler_config.json (a PNDM config, read for DDIM).
SD2_BASE_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# Per-example timesteps of a batch: both ends of the schedule and points between.
T_BATCH = np.array([0, 1, 250, 500, 998, 999], np.int32)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_tables_match_diffusers(beta_schedule):
    # We compute in float64 and round once; diffusers computes in float32 torch: the
    # tables agree to about one float32 rounding (the cosine schedule's capped last
    # step, ᾱ_999 ≈ 2e-9, differs more in relative terms: 1 - β there loses digits).
    ours = make_schedule(beta_schedule, beta_start=0.00085, beta_end=0.012)
    ref = DDPMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=3e-7, atol=0)
    np.testing.assert_allclose(
        ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-6, atol=1e-12
    )
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == np.float32


def test_from_diffusers_reads_sd2_base_config():
    schedule = Schedule.from_diffusers(SD2_BASE_CONFIG)
    default = make_schedule()
    np.testing.assert_array_equal(schedule.alphas_cumprod, default.alphas_cumprod)
    assert jax.tree.structure(schedule) == jax.tree.structure(default)  # the static settings
    ref = DDIMScheduler.from_config(SD2_BASE_CONFIG)
    np.testing.assert_allclose(schedule.alphas_cumprod, ref.alphas_cumprod, rtol=2e-6)


def test_from_diffusers_uses_ddim_defaults():
    config = DDIMScheduler(
        beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False
    ).config
    schedule = Schedule.from_diffusers(dict(config))
    assert schedule.prediction_type == "v_prediction"
    assert (schedule.steps_offset, schedule.set_alpha_to_one) == (0, True)
    np.testing.assert_allclose(schedule.betas, DDIMScheduler(**config).betas, rtol=3e-7)


@pytest.mark.parametrize(
    "key, value",
    [
        ("beta_schedule", "sigmoid"),
        ("prediction_type", "sample"),
        ("timestep_spacing", "karras"),
        ("clip_sample", True),
        ("thresholding", True),
        ("rescale_betas_zero_snr", True),
        ("trained_betas", [0.1] * 1000),
    ],
)
def test_from_diffusers_rejects_unsupported_values(key, value):
    with pytest.raises(UserError, match=f"{key}="):
        Schedule.from_diffusers({**SD2_BASE_CONFIG, key: value})


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((len(T_BATCH), 4, 3, 2)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    return x0, noise


@pytest.mark.parametrize("rank", [2, 4])
def test_add_noise_and_velocity_match_diffusers(batch, rank):
    x0, noise = (a.reshape(a.shape[0], -1) if rank == 2 else a for a in batch)
    ref = DDPMScheduler(**SD)
    args = [torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(T_BATCH).long()]
    schedule = make_schedule()
    np.testing.assert_allclose(
        add_noise(schedule, x0, noise, T_BATCH), ref.add_noise(*args), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        velocity(schedule, x0, noise, T_BATCH), ref.get_velocity(*args), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_and_eps_inverts_add_noise(batch, prediction_type):
    x0, noise = batch
    schedule = make_schedule(prediction_type=prediction_type)
    x_t = add_noise(schedule, x0, noise, T_BATCH)
    target = noise if prediction_type == "epsilon" else velocity(schedule, x0, noise, T_BATCH)
    x0_hat, eps_hat = predict_x0_and_eps(schedule, x_t, target, T_BATCH)
    # x̂_0 from ε divides by √ᾱ_999 ≈ 0.07: float32 rounding of x_t grows ~15x there.
    np.testing.assert_allclose(x0_hat, x0, rtol=0, atol=2e-5)
    np.testing.assert_allclose(eps_hat, noise, rtol=0, atol=2e-5)
