"""The ablation switches of ModelConfig (docs/method.md §7) remove exactly their input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.errors import UserError
from sdjax.export import export_pipeline
from sdjax.subject_diffusion import encode_prompt, ground, subject_location

BOXES = jnp.array([[[0.1, 0.2, 0.5, 0.6], [0.5, 0.5, 0.9, 0.9]]])
OTHER_BOXES = jnp.array([[[0.0, 0.0, 0.3, 0.3], [0.6, 0.1, 0.9, 0.4]]])
VALID = jnp.array([[True, True]])


def with_switch(pipe, **switch):
    return dataclasses.replace(pipe.config, **switch)


def test_without_location_control_the_mask_is_the_dropped_one(pipe):
    on = subject_location(pipe.config, BOXES, VALID)
    off = subject_location(with_switch(pipe, location_control=False), BOXES, VALID)
    assert on.shape == off.shape == (1, 16, 16, 1)
    assert 0 < float(on.mean()) < 1
    assert not np.any(np.asarray(off))


def test_without_box_coordinates_grounding_ignores_the_boxes(pipe):
    img = pipe.config.image
    patches = jax.random.normal(jax.random.key(0), (1, 2, img.num_patches, img.hidden_size))
    use_box = jnp.array([[True, True]])

    def tokens(config, boxes):
        return np.asarray(ground(config, pipe.params, patches, boxes, VALID, use_box))

    on, off = pipe.config, with_switch(pipe, box_coordinates=False)
    assert not np.allclose(tokens(on, BOXES), tokens(on, OTHER_BOXES))
    np.testing.assert_array_equal(tokens(off, BOXES), tokens(off, OTHER_BOXES))


def test_without_cls_feature_the_prompt_ignores_the_references(pipe):
    ids = jnp.array([[1, 2, 3, 4, 5] + [0] * 19])
    positions = jnp.array([[2, 3]])
    dim = pipe.config.image.projection_dim
    cls_a, cls_b = (jax.random.normal(jax.random.key(k), (1, 2, dim)) for k in (1, 2))

    def context(config, cls):
        return np.asarray(encode_prompt(config, pipe.params, ids, cls, positions, VALID))

    on, off = pipe.config, with_switch(pipe, cls_feature=False)
    assert not np.allclose(context(on, cls_a), context(on, cls_b))
    np.testing.assert_array_equal(context(off, cls_a), context(off, cls_b))
    np.testing.assert_array_equal(context(off, cls_a), context(off, None))


def test_ablation_models_are_not_exported_to_diffusers(pipe, tmp_path):
    ablated = dataclasses.replace(pipe, config=with_switch(pipe, cls_feature=False))
    with pytest.raises(UserError, match="cls_feature off"):
        export_pipeline(ablated, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
