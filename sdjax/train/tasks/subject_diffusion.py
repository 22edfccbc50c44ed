"""The Subject-Diffusion task: the model `config.model` describes, trained on record shards.

`config.model` gives every part's architecture (`sdjax.subject_diffusion.ModelConfig` fields; with
`vocab = "toy"` the text tower knows the toy world's words only), `config.loss` the
objective (`sdjax.train.step.LossConfig`), `config.init` the optional pretrained weights
(`sdjax.convert.pretrained`) and `config.data` the records (`sdjax.data.loader`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.layers import unbox
from sdjax.subject_diffusion import ModelConfig, abstract_params, init_params
from sdjax.tokenizer import Tokenizer
from sdjax.train.state import TrainState, flatten
from sdjax.train.step import LossConfig, make_train_step
from sdjax.train.tasks.vocabulary import text_with_vocabulary


def model_config(config) -> tuple[ModelConfig, Tokenizer]:
    """The model `config.model` describes and the tokenizer of its vocabulary."""
    m = config.model.to_dict()
    text, tokenizer = text_with_vocabulary(dict(m.pop("text")), m.pop("vocab", None))
    if tokenizer.vocab_subset is not None:
        m["vocab_subset"] = list(tokenizer.vocab_subset)
    return ModelConfig.from_dict({**m, "text": text}), tokenizer


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


class SubjectDiffusionTask:
    def __init__(self, config):
        self.config = config
        self.model, self._tokenizer = model_config(config)
        self.meta = {"task": "subject_diffusion", "model": self.model.to_dict()}
        self.boxed = flatten(abstract_params(self.model))

    def batch_spec(self, batch: int) -> dict:
        return batch_spec(self.model, batch)

    def step(self, tx):
        loss = LossConfig(**self.config.get("loss", {}))
        return make_train_step(self.model, self.config.train, loss, tx)

    def init_flat(self, key) -> dict:
        return flatten(unbox(init_params(self.model, key)))

    def pretrained_flat(self, fresh: dict) -> dict:
        from sdjax.convert.pretrained import overlay_pretrained, pretrained_parts

        return overlay_pretrained(fresh, pretrained_parts(self.config.get("init"), self.model))

    def tokenizer(self) -> Tokenizer:
        """The vocabulary's tokenizer, or the pretrained folder's."""
        root = (self.config.get("init") or {}).get("pretrained")
        if not root:
            return self._tokenizer
        length = self.model.text.max_position_embeddings
        return Tokenizer(folder=os.path.join(root, "tokenizer"), max_length=length)

    def inputs(self, workdir: str, local_batch: int) -> tuple:
        from sdjax.data.loader import LoaderConfig, make_loader
        from sdjax.train.tasks.records import prepare_data

        config, tokenizer = self.config, self.tokenizer()
        data_path = prepare_data(config, workdir)
        data = LoaderConfig.from_dict({**config.data.to_dict(), "path": data_path})
        loader = make_loader(
            data, self.model, tokenizer, batch_size=local_batch, seed=config.train.seed
        )
        preview = None
        if config.train.get("preview_every", 0) and jax.process_count() == 1:
            preview = make_preview(self.model, tokenizer, data_path, workdir, config.train)
        return loader, preview


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
