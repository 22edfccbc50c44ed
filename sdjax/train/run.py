"""A run's train step and state, built the same way for `sdjax train` and `sdjax plan`.

A task (`sdjax.train.tasks`) says what trains. From it and a mesh:

- `plan_step` gives the abstract train state (ShapeDtypeStructs carrying their
  shardings), the global batch's shapes and the jitted step, with nothing concrete made:
  it compiles for devices that are not here (a TPU topology) as for the local ones;
- `make_run` adds what training needs: the initial state (created straight into its
  shardings, never whole on one host), the input iterator and the previews.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
from jax.sharding import NamedSharding, PartitionSpec

from sdjax.compiler import known_options
from sdjax.errors import UserError
from sdjax.models.layers import unbox
from sdjax.parallel.sharding import batch_sharding, replicated, tree_shardings
from sdjax.train.state import TrainState, create_state, optimizer
from sdjax.train.tasks import Task, task_for


@dataclass
class StepPlan:
    """The compiled-to-be step of a run: `step(state, batch) -> (state, metrics)`."""

    abstract_state: TrainState  # ShapeDtypeStructs with shardings
    batch: dict  # the global batch's ShapeDtypeStructs with the batch sharding
    step: Callable  # jax.jit with in/out shardings, the state donated
    state_shardings: TrainState
    param_shardings: dict  # 'part/path' -> NamedSharding
    create: Callable  # flat params -> fresh TrainState (jit it with its shardings)

    def lower(self):
        return self.step.lower(self.abstract_state, self.batch)

    def compile(self, log=print):
        start = time.perf_counter()
        compiled = self.lower().compile()
        log(f"train step compiled in {time.perf_counter() - start:.1f} s")
        return compiled

    def initial_state(self, init_flat, seed: int, pretrained=None) -> TrainState:
        """A fresh state made straight into its shardings: `init_flat(key)` (flat params),
        then `pretrained(fresh)`'s {name: numpy array} copied over them."""
        shardings = self.param_shardings
        params = jax.jit(lambda: init_flat(run_keys(seed)[0]), out_shardings=shardings)()
        for name, value in (pretrained(params) if pretrained else {}).items():
            params[name] = jax.device_put(value, shardings[name])
        create = jax.jit(self.create, out_shardings=self.state_shardings, donate_argnums=0)
        return create(params)


def run_keys(seed: int):
    """(parameter-init key, state key) of a run; call inside traced code."""
    return jax.random.split(jax.random.key(seed))


def plan_step(config, task: Task, mesh, rules) -> StepPlan:
    """The abstract state, batch and jitted step of `task` under `config.train` on `mesh`."""
    train = config.train
    tx = optimizer(train)
    patterns = tuple(train.trainable)
    ema = bool(train.get("ema", False))
    param_sh = tree_shardings(task.boxed, mesh, rules)

    def create(params):
        return create_state(params, patterns, tx, ema, run_keys(train.seed)[1])

    abstract = jax.eval_shape(create, unbox(task.boxed))
    if not abstract.trainable:
        raise UserError(f"train.trainable {patterns} matches no parameter")
    shardings = state_shardings(abstract, param_sh, mesh)
    placed = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    batch_sh = batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
        for k, v in task.batch_spec(train.batch_size).items()
    }
    step = jax.jit(
        task.step(tx),
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options(train, mesh.devices.flat[0]),
    )
    return StepPlan(placed, batch, step, shardings, param_sh, create)


# XLA:TPU's windowed einsum ("collective matmul") computes a matmul or convolution whose
# weight is split over fsdp in a loop over the weight's shards, passed round the ring
# while each is used, instead of one all-gather before it. On SD 2-base's step it loops
# 1108 of them (every VAE, ViT, text-encoder and UNet layer), each carrying the whole
# output: the compiler's cost model puts a loop of 3x3 convolutions at several times
# the all-gathered one, and its cost analysis counts each loop body once, so `sdjax plan`
# could not read the step's FLOPs or time. Off unless `train.collective_matmul`.
_NO_COLLECTIVE_MATMUL = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


def compiler_options(train_cfg, device) -> dict | None:
    """The train step's XLA options for `device`'s compiler (TPU: `_NO_COLLECTIVE_MATMUL`,
    as far as this libtpu knows them)."""
    if device.platform == "tpu" and not train_cfg.get("collective_matmul", False):
        return known_options(_NO_COLLECTIVE_MATMUL, device) or None
    return None


def state_shardings(abstract: TrainState, params: dict, mesh) -> TrainState:
    """Shardings of a state: each parameter (and its Adam moments and EMA) as `params`
    says; counters and rng replicated."""
    rep = NamedSharding(mesh, PartitionSpec())

    def by_name(path, _):
        names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        return next((params[n] for n in names if n in params), rep)

    return jax.tree_util.tree_map_with_path(by_name, abstract)


@dataclass
class Run:
    plan: StepPlan
    meta: dict  # what a checkpoint records about the model (task, configs)
    loader: object  # iterator of batches with get_state() / set_state()
    initial_state: Callable[[], TrainState]
    preview: Callable | None = None  # (state, step) -> None


def make_run(config, workdir: str, mesh, rules, local_batch: int) -> Run:
    """Everything a training run needs before its first step (the task's files are read
    here: pretrained weights, data)."""
    task = task_for(config)
    plan = plan_step(config, task, mesh, rules)
    loader, preview = task.inputs(workdir, local_batch)

    def initial_state() -> TrainState:
        return plan.initial_state(task.init_flat, config.train.seed, task.pretrained_flat)

    return Run(plan, task.meta, loader, initial_state, preview)
