"""The training loop: `sdjax train --config FILE --workdir DIR [--set key=value]...`.

Rerunning the same command resumes from the latest checkpoint, exactly: parameters,
optimizer state, EMA, rng and the input iterator are restored, and `metrics.jsonl` is cut
back to the checkpoint's step, so the steps after a resume equal an uninterrupted run's.
SIGTERM (preemption) checkpoints the step in flight and exits 0. A non-finite loss stops
the run, naming the step, without saving (the last good checkpoint stays the latest).

Writes: `DIR/config.json` (resolved config), `DIR/metrics.jsonl` (one object per logged
step: step, loss, each loss term, lr, grad_norm, examples_per_s), TensorBoard events in
`DIR/tensorboard/`, checkpoints in `DIR/checkpoints/`, previews in `DIR/previews/`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from sdjax import checkpoint
from sdjax.config import config_to_json
from sdjax.errors import UserError
from sdjax.parallel import distributed
from sdjax.parallel.mesh import batch_size_per_process, make_mesh
from sdjax.parallel.sharding import as_rules, batch_sharding, global_batch, replicated
from sdjax.train.setup import Run, setup_run


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop logged steps after `last_step` (written by a run that was then killed)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(keep)


class MetricsLog:
    """metrics.jsonl and TensorBoard, written by process 0 only."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.active = jax.process_index() == 0
        self.tb = None
        if self.active:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step":
                self.tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(config, workdir: str) -> dict:
    """Train to `config.train.num_steps` (resuming if a checkpoint exists); returns the
    last step's metrics."""
    distributed.initialize()
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(config.mesh.to_dict())
    rules = as_rules(config.sharding_rules)
    local_batch = batch_size_per_process(config.train.batch_size, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        run = setup_run(config, workdir, mesh, rules, local_batch)
        return _loop(config, workdir, mesh, run)


def _loop(config, workdir: str, mesh, run: Run) -> dict:
    train_cfg = config.train
    mngr = checkpoint.manager(workdir, train_cfg.get("max_to_keep", 3))
    latest = mngr.latest_step()
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if latest is not None:
        state, data_state, _ = checkpoint.restore(mngr, latest, run.abstract_state)
        run.loader.set_state(data_state["processes"][jax.process_index()])
        truncate_metrics(metrics_path, latest)
        print(f"resumed from step {latest} in {workdir}")
    else:
        state = run.initial_state()
        truncate_metrics(metrics_path, 0)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config_to_json(config))
    step_fn = run.compile(batch_sharding(mesh), replicated(mesh))
    distributed.barrier("sdjax_train_compiled")
    meta_info = {"config": json.loads(config_to_json(config)), **run.meta}

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    log = MetricsLog(workdir)
    first = int(jax.device_get(state.step))
    bar = tqdm(
        total=train_cfg.num_steps,
        initial=first,
        unit="step",
        disable=jax.process_index() != 0 or None,
    )
    metrics, tick = {}, time.perf_counter()
    try:
        for step in range(first + 1, train_cfg.num_steps + 1):
            batch = global_batch(next(run.loader), mesh)
            state, metrics = step_fn(state, batch)
            metrics = jax.device_get(metrics)
            if not math.isfinite(float(metrics["loss"])):
                raise TrainingDiverged(
                    f"loss is {float(metrics['loss'])} at step {step}; stopping without "
                    f"saving (last checkpoint: step {mngr.latest_step()})"
                )
            now = time.perf_counter()
            metrics["examples_per_s"] = train_cfg.batch_size / max(now - tick, 1e-9)
            tick = now
            if step % train_cfg.log_every == 0 or step == train_cfg.num_steps:
                log.write(step, metrics)
                bar.set_postfix(
                    loss=f"{float(metrics['loss']):.4f}", ex_s=f"{metrics['examples_per_s']:.1f}"
                )
            bar.update(1)
            last = step == train_cfg.num_steps
            if step % train_cfg.checkpoint_every == 0 or last or stop["signal"]:
                loaders = distributed.gather_json(run.loader.get_state())
                checkpoint.save(mngr, state, {"processes": loaders}, meta_info)
            if run.preview is not None and step % train_cfg.get("preview_every", 0) == 0:
                run.preview(state, step)
            if stop["signal"]:
                print(f"SIGTERM: saved step {step}; exiting")
                break
    finally:
        mngr.wait_until_finished()
        mngr.close()
        bar.close()
        log.close()
        signal.signal(signal.SIGTERM, previous)
    return {k: float(np.asarray(v)) for k, v in metrics.items()}
