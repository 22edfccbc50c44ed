"""The training loop: `sdjax train --config FILE --workdir DIR [--set key=value]...`.

DIR is a local folder or a `gs://` URL (`sdjax.paths`); every process of a multi-host run
must see the same DIR. Rerunning the same command resumes from the latest checkpoint,
exactly: parameters, optimizer state, EMA, rng and the input position are restored, and
`metrics.jsonl` is cut back to the checkpoint's step, so the steps after a resume equal an
uninterrupted run's. The resumed run may have another mesh or another process count
(`data_position` converts the input position).

Between logging steps nothing is fetched from the devices: the step's metrics stay there,
and a device-side flag remembers the first step whose loss was not finite. At each logging
step (and before each checkpoint) the flag is read: a non-finite loss stops the run, naming
that step, without saving (the last good checkpoint stays the latest).

Preemption: SIGTERM to any process stops every process after the same step
(`distributed.PreemptionWatch`); they save that step together and `train` raises
`Preempted` (exit status 75, which launch/ scripts requeue or rerun).

Writes: `DIR/config.json` (resolved config), `DIR/metrics.jsonl` (one object per logged
step: step, loss, each loss term, lr, grad_norm, examples_per_s), TensorBoard events in
`DIR/tensorboard/`, checkpoints in `DIR/checkpoints/`, previews in `DIR/previews/`.
"""

from __future__ import annotations

import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sdjax import checkpoint, paths
from sdjax.config import config_to_json
from sdjax.errors import UserError
from sdjax.parallel import distributed
from sdjax.parallel.mesh import batch_size_per_process, make_mesh
from sdjax.parallel.sharding import as_rules, global_batch, replicated
from sdjax.train.data_position import resume_state, saved_position
from sdjax.train.run import Run, make_run


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class Preempted(SystemExit):
    """Every process stopped after the same step on SIGTERM and saved it; the command exits
    `distributed.PREEMPTED_EXIT` so that a launcher requeues it (rerunning resumes)."""

    def __init__(self, step: int):
        super().__init__(distributed.PREEMPTED_EXIT)
        self.step = step


class MetricsLog:
    """metrics.jsonl and TensorBoard, written by process 0 only.

    metrics.jsonl is rewritten whole at each logging step (GCS objects cannot be appended
    to; a rewrite is also never a torn line after a kill). Rows logged after `last_step`
    by a run that was then killed are dropped when the log opens. For a gs:// workdir the
    TensorBoard events are written to a local staging folder and uploaded at most every
    `TB_UPLOAD_S` seconds and on close.
    """

    TB_UPLOAD_S = 60.0

    def __init__(self, workdir: str, last_step: int):
        self.path = paths.resolve(workdir) / "metrics.jsonl"
        self.active = jax.process_index() == 0
        self.lines: list[str] = []
        self.tb = None
        self.tb_dir = paths.resolve(workdir) / "tensorboard"
        self._staging = None
        self._uploaded = time.perf_counter()
        if not self.active:
            return
        if self.path.exists():
            rows = [line for line in self.path.read_text().splitlines() if line.strip()]
            self.lines = [line for line in rows if json.loads(line)["step"] <= last_step]
            if len(self.lines) != len(rows):
                self._flush()
        from tensorboardX import SummaryWriter

        if paths.is_remote(workdir):
            self._staging = paths.staging_dir("sdjax-tensorboard-")
        self.tb = SummaryWriter(self._staging.name if self._staging else str(self.tb_dir))

    def _flush(self) -> None:
        paths.write_text(self.path, "".join(line + "\n" for line in self.lines))

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.lines.append(json.dumps(row))
        self._flush()
        for key, value in row.items():
            if key != "step":
                self.tb.add_scalar(f"train/{key}", value, step)
        if self._staging and time.perf_counter() - self._uploaded > self.TB_UPLOAD_S:
            self._upload_tb()

    def _upload_tb(self) -> None:
        self.tb.flush()
        paths.upload_tree(self._staging.name, self.tb_dir)
        self._uploaded = time.perf_counter()

    def close(self) -> None:
        if self.tb is None:
            return
        if self._staging:
            self._upload_tb()
        self.tb.close()
        if self._staging:
            self._staging.cleanup()


@jax.jit
def _first_bad_step(bad, loss, step):
    """Device-side divergence flag: the first step whose loss was not finite (0: none)."""
    return jnp.where((bad == 0) & ~jnp.isfinite(loss), step, bad)


def train(config, workdir: str) -> dict:
    """Train to `config.train.num_steps` (resuming if a checkpoint exists); returns the
    last logged step's metrics. Raises `Preempted` after a collective SIGTERM stop."""
    distributed.initialize()
    paths.makedirs(workdir)
    mesh = make_mesh(config.mesh.to_dict())
    rules = as_rules(config.sharding_rules)
    local_batch = batch_size_per_process(config.train.batch_size, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        run = make_run(config, workdir, mesh, rules, local_batch)
        return _loop(config, workdir, mesh, run)


def _start(config, workdir: str, mngr, run: Run):
    """(state, first step): restored from the latest checkpoint, or fresh."""
    latest = mngr.latest_step()
    if latest is None:
        if jax.process_index() == 0:
            paths.write_text(paths.resolve(workdir) / "config.json", config_to_json(config))
        return run.initial_state(), 0
    state, data_state, _ = checkpoint.restore(mngr, latest, run.plan.abstract_state)
    run.loader.set_state(resume_state(data_state, run.loader.layout, latest))
    print(f"resumed from step {latest} in {workdir}")
    return state, latest


def _loop(config, workdir: str, mesh, run: Run) -> dict:
    train_cfg = config.train
    mngr = checkpoint.manager(workdir, train_cfg.get("max_to_keep", 3))
    state, first = _start(config, workdir, mngr, run)
    step_fn = run.plan.compile()
    distributed.barrier("sdjax_train_compiled")
    meta_info = {"config": json.loads(config_to_json(config)), **run.meta}
    rep = replicated(mesh)
    bad = jax.device_put(np.int32(0), rep)

    watch = distributed.PreemptionWatch()
    log = MetricsLog(workdir, first)
    bar = tqdm(
        total=train_cfg.num_steps,
        initial=first,
        unit="step",
        disable=jax.process_index() != 0 or None,
    )
    logged, since, tick = {}, 0, time.perf_counter()
    stopped = None
    try:
        for step in range(first + 1, train_cfg.num_steps + 1):
            batch = global_batch(next(run.loader), mesh)
            state, metrics = step_fn(state, batch)
            bad = _first_bad_step(bad, metrics["loss"], jax.device_put(np.int32(step), rep))
            since += 1
            last = step == train_cfg.num_steps
            log_now = step % train_cfg.log_every == 0 or last
            stop = watch.reached(step, shared=log_now)
            save_now = step % train_cfg.checkpoint_every == 0 or last or stop
            if log_now or save_now:
                _check_finite(bad, mngr)
            if log_now:
                now = time.perf_counter()
                logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
                logged["examples_per_s"] = since * train_cfg.batch_size / max(now - tick, 1e-9)
                since, tick = 0, now
                log.write(step, logged)
                bar.set_postfix(
                    loss=f"{logged['loss']:.4f}", ex_s=f"{logged['examples_per_s']:.1f}"
                )
            bar.update(1)
            if save_now:
                loaders = distributed.gather_json(run.loader.get_state())
                position = saved_position(loaders, step, train_cfg.batch_size)
                checkpoint.save(mngr, state, position, meta_info)
            if run.preview is not None and step % train_cfg.get("preview_every", 0) == 0:
                run.preview(state, step)
            if stop:
                stopped = step
                print(f"preempted: every process saved step {step}; exiting", flush=True)
                break
        mngr.wait_until_finished()
        # Nobody leaves before the last save is whole everywhere: a launcher that stops
        # the others once one exits must not cut a save short.
        distributed.barrier("sdjax_train_done")
    finally:
        mngr.wait_until_finished()
        mngr.close()
        bar.close()
        log.close()
        watch.close()
    if stopped is not None:
        raise Preempted(stopped)
    return logged


def _check_finite(bad, mngr) -> None:
    first_bad = int(jax.device_get(bad))
    if first_bad:
        raise TrainingDiverged(
            f"loss is not finite at step {first_bad}; stopping without saving "
            f"(last checkpoint: step {mngr.latest_step()})"
        )
