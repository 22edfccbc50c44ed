"""What a training run trains: one module per task, chosen by the config's `task` key.

A task is built from the config alone, without reading any file, so `sdjax plan` can
compile its step for a pod slice that is not here:

    task.meta              what a checkpoint records about the model (JSON)
    task.boxed             flat abstract parameters {'part/path': value with logical axes}
    task.batch_spec(n)     the loader's contract: ShapeDtypeStructs of a batch of n
    task.step(tx)          the train step (state, batch) -> (state, metrics)
    task.init_flat(key)    fresh flat parameters

and for training (these read files: pretrained weights, data):

    task.pretrained_flat(fresh)        {name: numpy array} to copy over fresh parameters
    task.inputs(workdir, local_batch)  (loader, preview or None)
"""

from __future__ import annotations

from typing import Protocol

from sdjax.errors import UserError


class Task(Protocol):
    meta: dict
    boxed: dict

    def batch_spec(self, batch: int) -> dict: ...

    def step(self, tx): ...

    def init_flat(self, key) -> dict: ...

    def pretrained_flat(self, fresh: dict) -> dict: ...

    def inputs(self, workdir: str, local_batch: int) -> tuple: ...


def task_for(config) -> Task:
    """The task `config.task` names (default: subject_diffusion)."""
    from sdjax.train.tasks.clip import ClipTask
    from sdjax.train.tasks.subject_diffusion import SubjectDiffusionTask

    tasks = {"subject_diffusion": SubjectDiffusionTask, "clip": ClipTask}
    name = config.get("task", "subject_diffusion")
    if name not in tasks:
        raise UserError(f"unknown task {name!r} (known: {', '.join(tasks)})")
    return tasks[name](config)
