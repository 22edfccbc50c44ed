"""Training checkpoints: one orbax CheckpointManager per run, under `WORKDIR/checkpoints/`.

A step's checkpoint holds separate items, so a sampler reads the parameters without the
optimizer state: `trainable`, `frozen`, `opt_state`, `ema` (when kept), `progress` (step
and rng), `data` (the input iterator's state, JSON) and `meta` (the resolved config and
the model config, JSON). Saves are async and atomic (on a local disk orbax renames a
temporary folder into place; on `gs://` it writes a commit marker last); a killed run leaves
only complete steps behind. Workdirs are local paths or `gs://` URLs (`sdjax.paths`).
"""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp

from sdjax import paths
from sdjax.convert.files import check_finite
from sdjax.errors import UserError

ARRAY_ITEMS = ("trainable", "frozen", "opt_state", "ema", "progress")
CHECKPOINTS = "checkpoints"


def manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        paths.resolve(workdir) / CHECKPOINTS,
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
    # orbax refuses empty trees (e.g. no frozen parameters): such items are not written.
    args = {k: ocp.args.StandardSave(v) for k, v in items.items() if jax.tree.leaves(v)}
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
    args = {k: ocp.args.StandardRestore(v) for k, v in items.items() if jax.tree.leaves(v)}
    args["data"] = ocp.args.JsonRestore()
    args["meta"] = ocp.args.JsonRestore()
    got = mngr.restore(step, args=ocp.args.Composite(**args))
    state = abstract_state.replace(
        step=got["progress"]["step"],
        rng=got["progress"]["rng"],
        trainable=got["trainable"],
        frozen=got.get("frozen", {}),
        opt_state=got["opt_state"],
        ema=got.get("ema") if abstract_state.ema is not None else None,
    )
    return state, got["data"], got["meta"]


def _step_folder(path: str):
    """(checkpoints root as an epath.Path, step) for a workdir (its latest complete step) or
    one step's folder, else None."""
    path = paths.resolve(path)
    root = path / CHECKPOINTS
    if root.is_dir():
        return (root, step) if (step := _reader(root).latest_step()) is not None else None
    if path.name.isdigit() and (path / "meta").is_dir() and _complete(path):
        return path.parent, int(path.name)
    return None


def _complete(step_dir) -> bool:
    """A step folder is whole: on a local disk orbax renames it into place when done; on
    gs:// it writes a commit marker last, so a step cut short by a kill has none."""
    return not paths.is_remote(step_dir) or (step_dir / "commit_success.txt").exists()


def is_training_checkpoint(path: str) -> bool:
    return _step_folder(path) is not None


def _reader(root) -> ocp.CheckpointManager:
    """A manager that knows every item's handler (so nothing is restored by guesswork)."""
    handlers = {k: ocp.StandardCheckpointHandler() for k in ARRAY_ITEMS}
    handlers.update(data=ocp.JsonCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
    return ocp.CheckpointManager(
        root, options=ocp.CheckpointManagerOptions(create=False), item_handlers=handlers
    )


def restore_params(path: str, use_ema: bool | None = None) -> tuple[dict, dict]:
    """(meta, flat numpy parameters {'part/path': array}) of a training workdir (latest
    step) or one step's folder: frozen + trained, the EMA when the run kept one (unless
    use_ema is False). Restored onto this host, whatever mesh saved them."""
    found = _step_folder(path)
    if found is None:
        raise UserError(f"no training checkpoint in {path}")
    root, step = found
    mngr = _reader(root)
    metadata = mngr.item_metadata(step)
    trained = "ema" if (metadata.get("ema") is not None and use_ema is not False) else "trainable"
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    args = {"meta": ocp.args.JsonRestore()}
    for name in (trained, "frozen"):
        if metadata.get(name) is None:  # not written: empty
            continue
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), metadata[name]
        )
        args[name] = ocp.args.StandardRestore(target)
    got = mngr.restore(step, args=ocp.args.Composite(**args))
    flat = {k: np.asarray(v) for k, v in {**got.get("frozen", {}), **got[trained]}.items()}
    check_finite(flat, f"{path} (step {step})")
    return got["meta"], flat
