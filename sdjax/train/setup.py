"""Everything a training run needs before its first step, built from the config.

The model (fresh or from pretrained files), its data (the toy world is generated on first
use), the input iterator, the abstract train state with its shardings (so a state is
created or restored straight into place, never whole on one host), the compiled step, and
the optional sample previews.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sdjax.errors import UserError
from sdjax.model import ModelConfig, abstract_params, init_params
from sdjax.models.layers import unbox
from sdjax.parallel.sharding import tree_shardings
from sdjax.tokenizer import Tokenizer
from sdjax.train.init import (
    load_image_encoder,
    model_from_pretrained,
    model_from_scratch,
    overlay_pretrained,
)
from sdjax.train.state import TrainState, create_state, flatten, optimizer
from sdjax.train.step import LossConfig, compile_step, make_train_step


@dataclass
class Run:
    meta: dict  # what a checkpoint records about the model (task, configs)
    loader: object  # iterator of batches with get_state() / set_state()
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    initial_state: Callable[[], TrainState]
    compile: Callable  # (batch_sharding, replicated) -> compiled step
    preview: Callable | None = None  # (state, step) -> None


def build_run(
    config, mesh, rules, *, meta, loader, boxed, init_flat, pretrained_flat, step_fn, batch
) -> Run:
    """The task-independent part of a run.

    boxed: flat abstract parameters with logical axes; init_flat(key) -> flat parameters;
    pretrained_flat(fresh) -> {name: numpy} to copy over the fresh ones; step_fn(state,
    batch); batch: the global batch's ShapeDtypeStructs.
    """
    tx = optimizer(config.train)
    patterns = tuple(config.train.trainable)
    ema = bool(config.train.get("ema", False))
    param_sh = tree_shardings(boxed, mesh, rules)
    init_key, state_key = jax.random.split(jax.random.key(config.train.seed))
    abstract = jax.eval_shape(lambda p: create_state(p, patterns, tx, ema, state_key), unbox(boxed))
    if not abstract.trainable:
        raise UserError(f"train.trainable {patterns} matches no parameter")
    shardings = state_shardings(abstract, param_sh, mesh)
    placed = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )

    def initial_state() -> TrainState:
        params = jax.jit(init_flat, out_shardings=param_sh)(init_key)
        for name, value in pretrained_flat(params).items():
            params[name] = jax.device_put(value, param_sh[name])
        create = jax.jit(
            lambda p: create_state(p, patterns, tx, ema, state_key),
            out_shardings=shardings,
            donate_argnums=0,
        )
        return create(params)

    def compile_for(batch_sharding, replicated):
        return compile_step(step_fn(tx), placed, batch, shardings, batch_sharding, replicated)

    return Run(meta, loader, placed, initial_state, compile_for)


def build_model(config) -> tuple[ModelConfig, Tokenizer, dict]:
    """(model config, tokenizer, pretrained params by part) for this training config."""
    if config.get("init") and config.init.get("pretrained"):
        return model_from_pretrained(config)
    model, tokenizer = model_from_scratch(config)
    pretrained = {}
    source = config.get("init", {}).get("image_encoder") if config.get("init") else None
    if source:
        image_cfg, pretrained["image_encoder"] = load_image_encoder(source)
        if image_cfg != model.image:
            raise UserError(
                f"init.image_encoder {source} does not match model.image "
                f"({image_cfg} vs {model.image})"
            )
    return model, tokenizer, pretrained


def prepare_data(config, workdir: str) -> str:
    """The dataset folder; a toy world is generated there first when it is missing."""
    from sdjax import paths
    from sdjax.data.shards import MANIFEST

    path = config.data.path or paths.join(workdir, "data")
    manifest = paths.join(path, MANIFEST)
    if paths.exists(manifest):
        return path
    toy_n = config.data.get("toy_n", 0)
    if not toy_n:
        raise UserError(f"no dataset at data.path={path} (no {MANIFEST})")
    if jax.process_index() == 0:
        from sdjax.data.generate import write_toy_dataset

        print(f"generating the toy world ({toy_n} scenes) in {path}")
        write_toy_dataset(
            path,
            toy_n,
            seed=config.data.get("toy_seed", 0),
            size=config.data.get("toy_size", 64),
            overwrite=True,
        )
    while not paths.exists(manifest):  # other hosts wait for it
        time.sleep(1.0)
    return path


def batch_spec(model: ModelConfig, batch: int) -> dict:
    """Shapes and dtypes of a global batch (the loader's contract)."""
    n, r, s, m = model.max_subjects, model.resolution, model.image.image_size, model.latent_size
    f32, i32 = jnp.float32, jnp.int32
    spec = {
        "image": ((batch, r, r, 3), f32),
        "refs": ((batch, n, s, s, 3), f32),
        "boxes": ((batch, n, 4), f32),
        "valid": ((batch, n), bool),
        "use_box": ((batch, n), bool),
        "ids": ((batch, model.text.max_position_embeddings), i32),
        "placeholders": ((batch, n), i32),
        "label_positions": ((batch, n), i32),
        "masks": ((batch, n, m, m), f32),
        "regions": ((batch, n, m, m), f32),
        "drop_text": ((batch,), bool),
        "drop_loc": ((batch,), bool),
        "drop_objs": ((batch,), bool),
        "noise_seed": ((batch,), i32),
    }
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in spec.items()}


def state_shardings(abstract: TrainState, params: dict, mesh) -> TrainState:
    """Shardings of a state: each parameter (and its Adam moments and EMA) as `params`
    says; counters and rng replicated."""
    rep = NamedSharding(mesh, PartitionSpec())

    def by_name(path, _):
        names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        return next((params[n] for n in names if n in params), rep)

    return jax.tree_util.tree_map_with_path(by_name, abstract)


def setup_run(config, workdir: str, mesh, rules, local_batch: int) -> Run:
    """The run of `config.task`: "subject_diffusion" (default) or "clip"."""
    task = config.get("task", "subject_diffusion")
    if task == "clip":
        from sdjax.train.clip_task import setup_clip_run

        return setup_clip_run(config, workdir, mesh, rules, local_batch)
    if task != "subject_diffusion":
        raise UserError(f"unknown task {task!r} (subject_diffusion or clip)")
    from sdjax.data.loader import LoaderConfig, make_loader

    model, tokenizer, pretrained = build_model(config)
    data_path = prepare_data(config, workdir)
    loader = make_loader(
        LoaderConfig.from_dict({**config.data.to_dict(), "path": data_path}),
        model,
        tokenizer,
        batch_size=local_batch,
        seed=config.train.seed,
    )
    loss_cfg = LossConfig(**config.get("loss", {}))
    run = build_run(
        config,
        mesh,
        rules,
        meta={"task": "subject_diffusion", "model": model.to_dict()},
        loader=loader,
        boxed=flatten(abstract_params(model)),
        init_flat=lambda k: flatten(unbox(init_params(model, k))),
        pretrained_flat=lambda fresh: overlay_pretrained(fresh, pretrained),
        step_fn=lambda tx: make_train_step(model, config.train, loss_cfg, tx),
        batch=batch_spec(model, config.train.batch_size),
    )
    if config.train.get("preview_every", 0) and jax.process_count() == 1:
        run.preview = make_preview(model, tokenizer, data_path, workdir, config.train)
    return run


def make_preview(
    model: ModelConfig, tokenizer: Tokenizer, data_path: str, workdir: str, train_cfg
) -> Callable:
    """Every `preview_every` steps: the first records' subjects redrawn from their captions,
    written as `previews/step_NNNNNNN.png` (row: reference scene | sample)."""
    import io

    from PIL import Image

    from sdjax import paths
    from sdjax.data.records import image_array, mask_array
    from sdjax.data.shards import RecordSource
    from sdjax.pipeline import Pipeline
    from sdjax.sampling import Subject, sample
    from sdjax.train.state import unflatten

    source = RecordSource(data_path)
    records = [r for r in (source[i] for i in range(min(4, len(source)))) if r is not None]
    folder = paths.makedirs(paths.join(workdir, "previews"))

    def preview(state: TrainState, step: int) -> None:
        trained = state.ema if state.ema is not None else state.trainable
        pipe = Pipeline(model, unflatten({**state.frozen, **trained}), tokenizer)
        rows = []
        for record in records:
            image = image_array(record)
            h, w = image.shape[:2]
            subjects = [
                Subject(
                    image,
                    s.label,
                    mask_array(s),
                    (s.box[0] / w, s.box[1] / h, s.box[2] / w, s.box[3] / h),
                )
                for s in record.subjects[: model.max_subjects]
            ]
            out = sample(
                pipe,
                record.caption,
                subjects,
                seed=step,
                num_steps=train_cfg.get("preview_steps", 25),
            )[0]
            ref = Image.fromarray(image).resize(out.size)
            rows.append(np.concatenate([np.asarray(ref), np.asarray(out)], axis=1))
        png = io.BytesIO()
        Image.fromarray(np.concatenate(rows, axis=0)).save(png, format="PNG")
        paths.write_bytes(folder / f"step_{step:07d}.png", png.getvalue())

    return preview
