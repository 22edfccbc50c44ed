"""Train state: trainable parameters (with optimizer state and EMA) apart from frozen ones.

Which parameters train is a list of regular expressions over 'part/path' names
('unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel'); the authors'
choice (docs/method.md §4) is `AUTHORS_TRAINABLE`. Frozen parameters live outside the optimizer (no
Adam moments for the frozen UNet, VAE and image encoder) and are never written.

State trees are flat dicts {'part/path': array} so that the trainable/frozen split,
sharding and checkpoints all speak the same names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util

AUTHORS_TRAINABLE = (
    r"unet/.*/attn2/to_[kv]/",  # cross-attention keys and values
    r"unet/.*/fuser/",  # the adapters
    r"unet/conv_in/",  # the location channel's input conv
    r"text_encoder/",  # the whole fusion text encoder
    r"cls_mlp/",
    r"grounding/",
)


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    trainable: dict  # 'part/path' -> array
    frozen: dict
    opt_state: optax.OptState
    ema: dict | None  # EMA of `trainable`, or None
    rng: jax.Array  # PRNG key data (uint32), folded with the step each step


def flatten(params: dict) -> dict:
    """{'unet': {...}, ...} -> {'unet/conv_in/kernel': leaf, ...} (leaves kept as they are,
    partitioning boxes included)."""
    return {
        "/".join(path): leaf
        for path, leaf in traverse_util.flatten_dict(
            params, is_leaf=lambda _, x: not isinstance(x, dict)
        ).items()
    }


def unflatten(flat: dict) -> dict:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def split_trainable(flat: dict, patterns: Sequence[str]) -> tuple[dict, dict]:
    compiled = [re.compile(p) for p in patterns]
    trainable = {k: v for k, v in flat.items() if any(p.search(k) for p in compiled)}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return trainable, frozen


def learning_rate(train_cfg) -> optax.Schedule:
    """Linear warm-up to `lr`, then constant (the authors') or cosine decay to 0 at
    `schedule_steps` (default `num_steps`; set it to stop a run part-way along its schedule)."""
    warmup = optax.linear_schedule(0.0, train_cfg.lr, max(1, train_cfg.warmup_steps))
    if train_cfg.get("decay", "constant") == "cosine":
        horizon = train_cfg.get("schedule_steps") or train_cfg.num_steps
        rest = optax.cosine_decay_schedule(train_cfg.lr, max(1, horizon - train_cfg.warmup_steps))
    else:
        rest = optax.constant_schedule(train_cfg.lr)
    return optax.join_schedules([warmup, rest], [train_cfg.warmup_steps])


def optimizer(train_cfg) -> optax.GradientTransformation:
    """AdamW (the authors': betas 0.9/0.999, eps 1e-8, wd 0; docs/method.md §4) after optional
    global-norm clipping."""
    steps = []
    if train_cfg.get("clip_norm"):
        steps.append(optax.clip_by_global_norm(train_cfg.clip_norm))
    steps.append(
        optax.adamw(
            learning_rate(train_cfg),
            b1=train_cfg.get("b1", 0.9),
            b2=train_cfg.get("b2", 0.999),
            eps=train_cfg.get("eps", 1e-8),
            weight_decay=train_cfg.get("weight_decay", 0.0),
        )
    )
    return optax.chain(*steps)


def create_state(flat_params: dict, patterns: Sequence[str], tx, ema: bool, rng) -> TrainState:
    """A fresh state at step 0 from flat (unboxed) parameters."""
    trainable, frozen = split_trainable(flat_params, patterns)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        opt_state=tx.init(trainable),
        ema=jax.tree.map(jnp.copy, trainable) if ema else None,
        rng=jax.random.key_data(rng),
    )


def ema_decay_at(step, decay: float):
    """The EMA decay after `step` updates, warmed up as min(decay, (1 + step) / (10 + step)):
    without the warm-up an EMA at 0.999 still holds 8% of the initialisation after 2500
    steps."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema: dict, trainable: dict, decay) -> dict:
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, trainable)
