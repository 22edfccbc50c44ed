"""Train steps: a generic `make_step` around a task's loss, and Subject-Diffusion's loss
(`sdjax.train.run` compiles them with explicit shardings).

    step(state, batch) -> (state, metrics)

batch: the loader's contract (`sdjax.data.loader`): image `[B,R,R,3]`, refs
`[B,N,S,S,3]`, boxes `[B,N,4]`, valid / use_box `[B,N]`, ids `[B,L]`, placeholders /
label_positions `[B,N]`, masks / regions `[B,N,M,M]`, drop_text / drop_loc / drop_objs,
noise_seed `[B]`. Each example's noise, timestep t ~ U{0..T-1} and VAE posterior draw
come from the step's rng folded with its noise_seed: a resumed run repeats an
uninterrupted one exactly, and how a global batch is split over processes and devices
does not change what an example gets.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sdjax.diffusion.schedules import add_noise
from sdjax.subject_diffusion import (
    ModelConfig,
    denoise,
    encode_prompt,
    encode_subjects,
    ground,
    subject_location,
    subject_regions,
    to_latents,
)
from sdjax.train.losses import attention_map_loss, diffusion_loss
from sdjax.train.state import TrainState, ema_decay_at, learning_rate, unflatten, update_ema


class LossConfig(NamedTuple):
    attn_weight: float = 0.01  # lambda_attn (docs/method.md §4)
    attn_form: str = "balanced_l1"
    ema_decay: float = 0.9999


def example_keys(rng, seeds):
    """Three keys per example (noise, timestep, VAE draw): `[B]` seeds -> 3 x `[B]` keys."""
    keys = jax.vmap(lambda seed: jax.random.split(jax.random.fold_in(rng, seed), 3))(seeds)
    return keys[:, 0], keys[:, 1], keys[:, 2]


def make_step(losses, tx, lr, ema_decay: float):
    """A train step from a loss: `losses(trainable, frozen, batch, rng) -> (loss, terms)`.

    Gradients flow to the trainable parameters only; the step updates them with `tx`,
    then their EMA (when the state keeps one). Metrics: loss, the terms, grad_norm, lr.
    """

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, terms), grads = jax.value_and_grad(losses, has_aux=True)(
            state.trainable, state.frozen, batch, rng
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        ema = state.ema
        if ema is not None:
            ema = update_ema(ema, trainable, ema_decay_at(state.step, ema_decay))
        metrics = {
            "loss": loss,
            **terms,
            "grad_norm": optax.global_norm(grads),
            "lr": lr(state.step),
        }
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, ema=ema)
        return new, metrics

    return step


def subject_diffusion_losses(config: ModelConfig, loss_cfg: LossConfig):
    """Subject-Diffusion's objective on a batch (module docstring) as `make_step` wants it."""
    probe_on = loss_cfg.attn_weight > 0 and bool(config.unet.probe_layers)

    def losses(trainable, frozen, batch, rng):
        # Built while tracing: constants of the compiled step, not arrays on a device (the
        # step may compile for devices that are not here).
        schedule = config.noise.schedule()
        params = unflatten({**trainable, **frozen})
        k_noise, k_t, k_vae = example_keys(rng, batch["noise_seed"])
        x0 = to_latents(config, params, batch["image"], k_vae)  # a posterior draw each
        noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(k_noise)
        t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_train_timesteps))(k_t)
        x_t = add_noise(schedule, x0, noise, t)

        patches, cls = encode_subjects(config, params, batch["refs"])
        valid = batch["valid"]
        text_valid = valid & ~batch["drop_text"][:, None]
        context = encode_prompt(
            config, params, batch["ids"], cls, batch["placeholders"], text_valid
        )
        objs_valid = valid & ~batch["drop_objs"][:, None]
        objs = ground(config, params, patches, batch["boxes"], objs_valid, batch["use_box"])
        keep_loc = (~batch["drop_loc"]).astype(jnp.float32)[:, None, None, None]
        loc = subject_location(config, batch["boxes"], valid) * keep_loc
        regions = subject_regions(
            config,
            batch["regions"],
            objs_valid,
            batch["placeholders"],
            batch["label_positions"],
            text_valid,
        )

        terms = {}
        if probe_on:
            probe = jnp.concatenate([batch["placeholders"], batch["label_positions"]], axis=1)
            out, sown = denoise(config, params, x_t, t, context, objs, loc, probe, regions)
            terms["attn"] = attention_map_loss(
                jax.tree.leaves(sown["attn_probs"]), batch["masks"], text_valid, loss_cfg.attn_form
            )
        else:
            out = denoise(config, params, x_t, t, context, objs, loc, regions=regions)
        terms["mse"] = diffusion_loss(schedule, out, x0, noise, t)
        loss = terms["mse"] + loss_cfg.attn_weight * terms.get("attn", 0.0)
        return loss, terms

    return losses


def make_train_step(config: ModelConfig, train_cfg, loss_cfg: LossConfig, tx):
    """Subject-Diffusion's train step."""
    losses = subject_diffusion_losses(config, loss_cfg)
    return make_step(losses, tx, learning_rate(train_cfg), loss_cfg.ema_decay)
