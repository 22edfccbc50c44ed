"""A ready-to-sample Subject-Diffusion model: config, parameters and tokenizer.

`load_pipeline(path)` accepts
  - None: the embedded default model that ships inside the package;
  - a pipeline folder written by `save_pipeline`: `model.json` (format, config, tokenizer)
    + `params.safetensors` (our own layout, keys 'unet/conv_in/kernel') + optionally
    `tokenizer/` (vocab.json, merges.txt);
  - a training workdir (its latest checkpoint) or one step's checkpoint folder
    (`sdjax.checkpoint` reads it; this module makes it a pipeline).
Loading is strict: every parameter of the config must be present with its shape, and
finite (a NaN or infinity among the weights is refused: it would sample black images).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import jax

from sdjax import paths
from sdjax.convert.files import (
    CheckpointError,
    read_json,
    read_safetensors,
    write_json,
    write_safetensors,
)
from sdjax.convert.keys import flat_to_tree, tree_to_flat
from sdjax.errors import UserError
from sdjax.subject_diffusion import ModelConfig, abstract_params
from sdjax.tokenizer import Tokenizer

FORMAT = "sdjax-pipeline"
FORMAT_VERSION = 1
DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "assets", "default_model")


@dataclass(eq=False)  # compared and hashed by identity (caches key on it)
class Pipeline:
    config: ModelConfig
    params: dict  # part name -> parameter tree (numpy or jax arrays)
    tokenizer: Tokenizer


def make_tokenizer(config: ModelConfig, folder: str | None = None) -> Tokenizer:
    return Tokenizer(
        folder=folder,
        vocab_subset=config.vocab_subset,
        max_length=config.text.max_position_embeddings,
    )


def save_pipeline(pipeline: Pipeline, folder: str) -> None:
    """Write `pipeline` as a pipeline folder (see the module docstring)."""
    os.makedirs(folder, exist_ok=True)
    flat = {
        f"{part}/{key}": value
        for part, tree in pipeline.params.items()
        for key, value in tree_to_flat(tree).items()
    }
    write_safetensors(os.path.join(folder, "params.safetensors"), flat)
    tokenizer = "builtin"
    if pipeline.tokenizer.folder:
        tokenizer = "tokenizer"
        os.makedirs(os.path.join(folder, tokenizer), exist_ok=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(
                os.path.join(pipeline.tokenizer.folder, name), os.path.join(folder, tokenizer)
            )
    write_json(
        os.path.join(folder, "model.json"),
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": pipeline.config.to_dict(),
            "tokenizer": tokenizer,
        },
    )


def read_pipeline(folder: str) -> Pipeline:
    """A pipeline folder written by `save_pipeline`."""
    meta = read_json(os.path.join(folder, "model.json"))
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder}/model.json is not an {FORMAT} v{FORMAT_VERSION} file "
            f"(format {meta.get('format')!r}, version {meta.get('version')!r})"
        )
    config = ModelConfig.from_dict(meta["config"])
    flat = read_safetensors(os.path.join(folder, "params.safetensors"))
    abstract = abstract_params(config)
    params = {}
    for part in abstract:
        prefix = part + "/"
        state = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
        params[part] = flat_to_tree(state, abstract[part], what=f"{folder} ({part})")
    extra = sorted({k.split("/")[0] for k in flat} - set(abstract))
    if extra:
        raise CheckpointError(f"{folder}: unexpected model part {extra[0]!r}")
    tokenizer_folder = (
        None
        if meta.get("tokenizer") == "builtin"
        else os.path.join(folder, meta.get("tokenizer", "tokenizer"))
    )
    # On the device once, not copied again by every sampling call.
    return Pipeline(config, jax.device_put(params), make_tokenizer(config, tokenizer_folder))


def load_pipeline(path: str | None = None, use_ema: bool | None = None) -> Pipeline:
    """The embedded default model (path None), a pipeline folder, or a training checkpoint
    (its EMA weights when it keeps them, unless `use_ema` is False); local or `gs://`."""
    if path is None:
        if not os.path.isfile(os.path.join(DEFAULT_MODEL, "model.json")):
            raise UserError(
                f"the embedded default model is missing from {DEFAULT_MODEL}; "
                "reinstall sdjax or pass a checkpoint"
            )
        return read_pipeline(DEFAULT_MODEL)
    from sdjax.checkpoint import is_training_checkpoint  # orbax: only when needed

    if paths.is_remote(path):
        return _load_remote(path, use_ema)
    if not os.path.isdir(path):
        raise UserError(f"checkpoint folder not found: {path}")
    if os.path.isfile(os.path.join(path, "model.json")):
        return read_pipeline(path)
    if is_training_checkpoint(path):
        return pipeline_from_training(path, use_ema)
    raise UserError(
        f"{path} is neither an sdjax pipeline folder (model.json) nor a training checkpoint"
    )


def _load_remote(path: str, use_ema: bool | None) -> Pipeline:
    """A `gs://` training checkpoint (read in place) or pipeline folder (downloaded)."""
    from sdjax.checkpoint import is_training_checkpoint

    if is_training_checkpoint(path):
        return pipeline_from_training(path, use_ema)
    with paths.staging_dir("sdjax-pipeline-") as local:
        paths.download_tree(path, local)
        return load_pipeline(local, use_ema=use_ema)


def pipeline_from_training(path: str, use_ema: bool | None = None) -> Pipeline:
    """A sampling pipeline from a Subject-Diffusion training checkpoint (a workdir's latest
    step or one step's folder)."""
    from sdjax.checkpoint import restore_params
    from sdjax.train.state import unflatten

    meta, flat = restore_params(path, use_ema)
    if meta.get("task", "subject_diffusion") != "subject_diffusion":
        raise UserError(f"{path} is a {meta['task']!r} run, not a Subject-Diffusion model")
    config = ModelConfig.from_dict(meta["model"])
    return Pipeline(config, jax.device_put(unflatten(flat)), make_tokenizer(config))
