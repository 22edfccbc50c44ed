"""Region-bound attention: each subject's tokens reach only the positions of its region."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.conditioning import subject_region
from sdjax.models.adapter import GatedSelfAttention
from sdjax.models.attention import Attention
from sdjax.models.kernels import augment, factored_mask
from sdjax.models.regions import (
    Regions,
    adapter_factors,
    cross_factors,
    region_cells,
    token_subjects,
)

H = W = 4  # attention grid
M = 8  # latent size
N, P, L, D = 2, 3, 6, 8  # subjects, grounding tokens each, text tokens, width


def two_regions():
    """Subject 0 in the left half of the latent, subject 1 in the top-right quarter."""
    masks = np.zeros((1, N, M, M), np.float32)
    masks[0, 0, :, :4] = 1.0
    masks[0, 1, :4, 4:] = 1.0
    return jnp.asarray(masks)


def regions(objs=(True, True), text_valid=(True, True)):
    tokens = token_subjects(
        jnp.asarray([[3, 5]]), jnp.asarray([[1, 4]]), jnp.asarray([text_valid]), L
    )
    return Regions(two_regions(), jnp.asarray([objs]), tokens)


def inside(subject: int) -> np.ndarray:
    """bool `[H*W]`: grid cells of a subject's region."""
    return np.asarray(region_cells(two_regions(), H, W))[0, subject]


def test_token_subjects_marks_placeholders_and_labels():
    tokens = token_subjects(jnp.asarray([[3, 5]]), jnp.asarray([[1, 4]]), jnp.asarray([[1, 0]]), L)
    assert tokens.tolist() == [[-1, 0, -1, 0, -1, -1]]  # subject 1 is not valid: unbound


def test_region_cells_take_any_half_covered_pixel():
    masks = np.zeros((1, 1, M, M), np.float32)
    masks[0, 0, 0, 0] = 0.6  # one latent pixel, more than half inside
    masks[0, 0, 7, 7] = 0.4  # another, less than half
    cells = np.asarray(region_cells(jnp.asarray(masks), H, W))[0, 0]
    assert cells.tolist() == [True] + [False] * 15
    with pytest.raises(ValueError, match="does not divide"):
        region_cells(jnp.asarray(masks), 3, 3)


def test_masks_shapes_and_unbound_slots():
    r = regions(objs=(True, False))
    a = np.asarray(factored_mask(*adapter_factors(r, H, W, N * P)))[0, 0]  # [T+O, T+O]
    t = H * W
    assert a.shape == (t + N * P, t + N * P)
    assert a[:t, :t].all() and a[t:].all()  # visual keys, and object queries, unrestricted
    assert np.array_equal(a[:t, t : t + P], np.repeat(inside(0)[:, None], P, 1))
    assert a[:t, t + P :].all()  # subject 1 unbound (a null slot): seen everywhere
    c = np.asarray(factored_mask(*cross_factors(r, H, W)))[0, 0]  # [T, L]
    assert np.array_equal(c[:, 1], inside(0)) and np.array_equal(c[:, 5], inside(1))
    assert c[:, [0, 2]].all()


def _perturbed(apply, subject_slice, x, tokens):
    """Outputs for `tokens` and for `tokens` with one subject's entries replaced."""
    other = tokens.at[:, subject_slice].set(jax.random.normal(jax.random.key(9), (1, P, D)))
    return np.asarray(apply(x, tokens)), np.asarray(apply(x, other))


def test_adapter_subject_tokens_reach_only_their_region():
    x = jax.random.normal(jax.random.key(0), (1, H * W, D))
    objs = jax.random.normal(jax.random.key(1), (1, N * P, D))
    module = GatedSelfAttention(heads=2, head_dim=4)
    params = module.init(jax.random.key(2), x, objs)["params"]
    params = {**params, "alpha_attn": jnp.float32(1.0), "alpha_dense": jnp.float32(0.0)}
    factors = adapter_factors(regions(), H, W, N * P)

    def apply(x, objs):
        return module.apply({"params": params}, x, objs, factors)

    base, moved = _perturbed(apply, slice(P, 2 * P), x, objs)  # subject 1's tokens
    changed = np.abs(base - moved).max(axis=-1)[0] > 1e-6
    assert np.array_equal(changed, inside(1))


def test_cross_attention_subject_tokens_reach_only_their_region():
    x = jax.random.normal(jax.random.key(0), (1, H * W, D))
    context = jax.random.normal(jax.random.key(1), (1, L, D))
    module = Attention(heads=2, head_dim=4)
    params = module.init(jax.random.key(2), x, context)["params"]
    factors = cross_factors(regions(), H, W)
    probe = jnp.asarray([[3, 1, 5, 4]])  # placeholders and labels of both subjects
    out, sown = module.apply(
        {"params": params}, x, context, probe=probe, factors=factors, mutable=["attn_probs"]
    )
    probs = np.asarray(sown["attn_probs"]["probs"][0])[0]  # [T, 4]
    for column, subject in enumerate((0, 0, 1, 1)):
        assert (probs[~inside(subject), column] == 0).all()
        assert (probs[inside(subject), column] > 0).all()
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(module.apply({"params": params}, x, context, factors=factors))
    )
    # Subject 0's placeholder and label tokens (positions 3 and 1) change only its region.
    moved = context.at[:, [1, 3]].set(jax.random.normal(jax.random.key(9), (1, 2, D)))
    a = np.asarray(module.apply({"params": params}, x, context, factors=factors))
    b = np.asarray(module.apply({"params": params}, x, moved, factors=factors))
    assert np.array_equal(np.abs(a - b).max(axis=-1)[0] > 1e-6, inside(0))


def test_subject_region_box_and_silhouette():
    box = (0.25, 0.25, 0.75, 0.75)
    assert subject_region(box, 8).sum() == 16
    diamond = np.zeros((5, 5), bool)
    for i in range(5):
        diamond[i, abs(2 - i) : 5 - abs(2 - i)] = True
    region = subject_region(box, 8, diamond)
    assert 0 < region.sum() < 16 and region[2:6, 2:6].sum() == region.sum()
    tiny = subject_region((0.5, 0.5, 0.51, 0.51), 8)  # between pixel centres
    assert tiny.sum() == 1


def test_factored_mask_as_extra_head_dimensions_equals_the_mask():
    """The form the fused kernels take: masked logits lowered by 2^20 through R extra
    query/key dimensions give XLA's masked attention."""
    rng = np.random.default_rng(0)
    b, t, s, h, d, r = 2, 6, 5, 2, 4, 3
    q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for n in (t, s, s))
    blocked = jnp.asarray(rng.integers(0, 2, (b, t, r)), jnp.float32)
    groups = jnp.asarray(rng.integers(0, 2, (b, s, r)), jnp.float32).at[:, 0].set(0.0)
    scale = d**-0.5
    masked = jax.nn.dot_product_attention(q, k, v, scale=scale, mask=factored_mask(blocked, groups))
    qa, ka = augment(q, k, scale, (blocked, groups), multiple=8)
    assert qa.shape[-1] == 8
    fused = jax.nn.dot_product_attention(qa, ka, jnp.pad(v, ((0, 0),) * 3 + ((0, 4),)), scale=scale)
    np.testing.assert_allclose(np.asarray(fused)[..., :d], np.asarray(masked), atol=1e-6)
