"""Training checkpoints: one orbax CheckpointManager per run, under `WORKDIR/checkpoints/`.

A step's checkpoint holds separate items, so a sampler reads the parameters without the
optimizer state: `trainable`, `frozen`, `opt_state`, `ema` (when kept), `progress` (step
and rng), `data` (the input iterator's state, JSON) and `meta` (the resolved config and
the model config, JSON). Saves are async and atomic (orbax writes to a temporary folder
and renames it when complete); a killed run leaves only complete steps behind.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from sdjax.errors import UserError

ARRAY_ITEMS = ("trainable", "frozen", "opt_state", "ema", "progress")
CHECKPOINTS = "checkpoints"


def manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINTS)),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )


def save(mngr: ocp.CheckpointManager, state, data_state: dict, meta: dict) -> None:
    """Start an async save of `state` (a TrainState) at its step."""
    step = int(jax.device_get(state.step))
    items = {
        "trainable": state.trainable,
        "frozen": state.frozen,
        "opt_state": state.opt_state,
        "progress": {"step": state.step, "rng": state.rng},
    }
    if state.ema is not None:
        items["ema"] = state.ema
    args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
    args["data"] = ocp.args.JsonSave(data_state)
    args["meta"] = ocp.args.JsonSave(meta)
    mngr.save(step, args=ocp.args.Composite(**args))


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
    """(state, data_state, meta) of `step`, arrays placed as `abstract_state` says
    (ShapeDtypeStructs with shardings: any mesh, not only the one that saved)."""
    items = {
        "trainable": abstract_state.trainable,
        "frozen": abstract_state.frozen,
        "opt_state": abstract_state.opt_state,
        "progress": {"step": abstract_state.step, "rng": abstract_state.rng},
    }
    if abstract_state.ema is not None:
        items["ema"] = abstract_state.ema
    args = {k: ocp.args.StandardRestore(v) for k, v in items.items()}
    args["data"] = ocp.args.JsonRestore()
    args["meta"] = ocp.args.JsonRestore()
    got = mngr.restore(step, args=ocp.args.Composite(**args))
    state = abstract_state.replace(
        step=got["progress"]["step"],
        rng=got["progress"]["rng"],
        trainable=got["trainable"],
        frozen=got["frozen"],
        opt_state=got["opt_state"],
        ema=got.get("ema") if abstract_state.ema is not None else None,
    )
    return state, got["data"], got["meta"]


def _step_folder(path: str) -> tuple[str, int] | None:
    """(checkpoints root, step) for a workdir or one step's folder, else None."""
    path = os.path.abspath(path)
    root = os.path.join(path, CHECKPOINTS)
    if os.path.isdir(root):
        steps = [int(d) for d in os.listdir(root) if d.isdigit()]
        return (root, max(steps)) if steps else None
    name = os.path.basename(path)
    if name.isdigit() and os.path.isdir(os.path.join(path, "meta")):
        return os.path.dirname(path), int(name)
    return None


def is_training_checkpoint(path: str) -> bool:
    return _step_folder(path) is not None


def pipeline_from_training(path: str, use_ema: bool | None = None):
    """A sampling `Pipeline` from a training workdir (latest step) or a step folder.

    Uses the EMA parameters when the run kept them (unless use_ema is False).
    """
    from sdjax.model import ModelConfig
    from sdjax.pipeline import Pipeline, make_tokenizer
    from sdjax.train.state import unflatten

    found = _step_folder(path)
    if found is None:
        raise UserError(f"no training checkpoint in {path}")
    root, step = found
    mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True))
    present = set(os.listdir(os.path.join(root, str(step))))
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    trained = "ema" if ("ema" in present and use_ema is not False) else "trainable"
    args = {k: ocp.args.StandardRestore() for k in (trained, "frozen")}
    got = mngr.restore(step, args=ocp.args.Composite(**args))
    flat = {**got["frozen"], **got[trained]}
    params = unflatten({k: np.asarray(v) for k, v in flat.items()})
    config = ModelConfig.from_dict(meta["model"])
    return Pipeline(config, jax.device_put(params), make_tokenizer(config))
