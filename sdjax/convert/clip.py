"""transformers CLIP folders (config.json + model.safetensors) <-> (config, params).

The text encoder is a `CLIPTextModel` folder (SD's `text_encoder/`), the image encoder a
`CLIPVisionModelWithProjection` folder. Loading is strict: every key the model needs must
be present with its shape and no other key may be, except transformers' `position_ids`
buffers, which older files carry and which hold nothing to learn. Shapes come from
`jax.eval_shape`, so no model is ever initialised just to be overwritten.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.convert.files import (
    CheckpointError,
    read_json,
    read_weights,
    write_json,
    write_safetensors,
)
from sdjax.convert.keys import KeyTable, flax_to_torch, torch_to_flax
from sdjax.errors import UserError
from sdjax.models.clip import CLIPTextConfig, CLIPVisionConfig
from sdjax.models.clip_text import TextEncoder
from sdjax.models.clip_vision import ImageEncoder

WEIGHTS = "model.safetensors"
CONFIG = "config.json"

TEXT_KEYS = KeyTable(lists=frozenset({"layers"}), prefix="text_model.")
VISION_KEYS = KeyTable(lists=frozenset({"layers"}))

# transformers' non-persistent index buffers (`arange(positions)`); older files saved them.
_POSITION_ID_BUFFERS = frozenset(
    {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}
)


def abstract_text_params(config: CLIPTextConfig):
    """The text encoder's parameter tree as ShapeDtypeStructs (nothing is allocated)."""
    ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(TextEncoder(config).init, jax.random.key(0), ids)["params"]


def abstract_image_params(config: CLIPVisionConfig):
    """The image encoder's parameter tree as ShapeDtypeStructs (nothing is allocated)."""
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    return jax.eval_shape(ImageEncoder(config).init, jax.random.key(0), images)["params"]


def text_encoder_from_transformers(folder: str) -> tuple[CLIPTextConfig, dict]:
    """A transformers `CLIPTextModel` folder -> (config, float32 numpy params)."""
    config = read_config(folder, CLIPTextConfig)
    state = without_position_ids(read_weights(folder, WEIGHTS))
    return config, torch_to_flax(state, abstract_text_params(config), TEXT_KEYS, what=folder)


def image_encoder_from_transformers(folder: str) -> tuple[CLIPVisionConfig, dict]:
    """A transformers `CLIPVisionModelWithProjection` folder -> (config, float32 params)."""
    config = read_config(folder, CLIPVisionConfig)
    state = without_position_ids(read_weights(folder, WEIGHTS))
    return config, image_params_from_state(config, state, what=folder)


def image_params_from_state(config: CLIPVisionConfig, state: Mapping[str, np.ndarray], *, what):
    """Our image-encoder params from a state dict in transformers' names, strictly."""
    return torch_to_flax(state, abstract_image_params(config), VISION_KEYS, what=what)


def text_encoder_to_transformers(config: CLIPTextConfig, params, folder: str) -> None:
    """Write a folder `transformers.CLIPTextModel.from_pretrained` loads (float32)."""
    _write(folder, config, params, TEXT_KEYS, abstract_text_params(config))


def image_encoder_to_transformers(config: CLIPVisionConfig, params, folder: str) -> None:
    """Write a folder `transformers.CLIPVisionModelWithProjection.from_pretrained` loads."""
    _write(folder, config, params, VISION_KEYS, abstract_image_params(config))


def read_config(folder: str, cls):
    """`cls.from_transformers` of `folder/config.json`; a bad config names the file."""
    path = os.path.join(folder, CONFIG)
    config = read_json(path)
    try:
        return cls.from_transformers(config)
    except UserError as err:
        raise CheckpointError(f"{path}: {err}") from None


def without_position_ids(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`state` without transformers' CLIP `position_ids` buffers (see `_POSITION_ID_BUFFERS`)."""
    return {k: v for k, v in state.items() if k not in _POSITION_ID_BUFFERS}


def _write(folder: str, config, params, table: KeyTable, abstract) -> None:
    state = flax_to_torch(params, table)
    # The same strict check a load does: params that do not fit the config never get written.
    torch_to_flax(state, abstract, table, what=f"params for {folder}")
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, WEIGHTS), state)
    write_json(os.path.join(folder, CONFIG), config.to_transformers())
