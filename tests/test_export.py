"""Export to PyTorch: the exported folder samples the same images in PyTorch as sdjax."""

import jax
import numpy as np
import pytest
import torch
from parity import assert_parity
from tiny import pipeline_for, tiny_config, tiny_latent_config

import sdjax
from sdjax.conditioning import location_mask
from sdjax.export import export_pipeline
from sdjax.sampling import generate, initial_noise, prepare_inputs
from sdjax.subject_diffusion import ground
from sdjax.torch_modules import TorchSubjectDiffusion, load_cls_mlp, load_grounding
from sdjax.torch_modules import location_mask as torch_location_mask

STEPS = 4


def subjects():
    ref = np.full((20, 30, 3), 255, np.uint8)
    ref[5:15, 10:20] = [200, 30, 30]
    return [
        sdjax.Subject(ref, "star", box=(0.1, 0.1, 0.6, 0.7)),
        sdjax.Subject(ref[:, ::-1], "ring"),
    ]


CONFIGS = {
    "pixels": tiny_config,
    "latents": tiny_latent_config,
    "regions": lambda: tiny_config(region_attention=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    config = CONFIGS[request.param]()
    pipe = pipeline_for(config, seed=2)
    folder = str(tmp_path_factory.mktemp(f"export_{request.param}"))
    export_pipeline(pipe, folder)
    return pipe, folder


def test_grounding_and_cls_mlp_match_in_pytorch(exported):
    pipe, folder = exported
    rng = np.random.default_rng(0)
    patches = rng.standard_normal((2, 2, 4, 16)).astype(np.float32)
    boxes = rng.uniform(0, 1, (2, 2, 4)).astype(np.float32)
    valid = np.array([[True, False], [True, True]])
    use_box = np.array([[True, True], [False, True]])
    ours = ground(pipe.config, pipe.params, patches, boxes, valid, use_box)
    torch_net = load_grounding(f"{folder}/grounding")
    with torch.no_grad():
        ref = torch_net(*(torch.from_numpy(a) for a in (patches, boxes, valid, use_box)))
    assert_parity(ours, ref.numpy())
    cls = rng.standard_normal((2, 2, 16)).astype(np.float32)
    from sdjax.subject_diffusion import modules

    ours = modules(pipe.config)["cls_mlp"].apply({"params": pipe.params["cls_mlp"]}, cls)
    with torch.no_grad():
        ref = load_cls_mlp(f"{folder}/cls_mlp")(torch.from_numpy(cls))
    assert_parity(ours, ref.numpy())


def test_location_mask_matches_in_pytorch():
    boxes = np.array(
        [
            [[0.1, 0.1, 0.6, 0.5], [0.4, 0.3, 0.9, 0.93], [0.0, 0.0, 1.0, 1.0]],
            [[0.21, 0.2, 0.8, 0.77], [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]],
            [[0.0, 0.0, 1.0, 1.0]] * 3,
        ],
        np.float32,
    )  # x1, y1, x2, y2; the third box of image 0 and all of image 2 are not valid
    valid = np.array([[True, True, False], [True, False, False], [False, False, False]])
    ours = np.asarray(location_mask(boxes, valid, 16))[..., 0]
    theirs = torch_location_mask(torch.from_numpy(boxes), torch.from_numpy(valid), 16)
    np.testing.assert_array_equal(ours, theirs[:, 0].numpy())
    assert 0 < ours[0].mean() < 1 and ours[2].min() == 1


def test_exported_model_samples_the_same_images_in_pytorch(exported):
    pipe, folder = exported
    inputs = prepare_inputs(pipe, "a red star and a blue ring on white background", subjects())
    batch = {k: np.stack([v, v]) for k, v in inputs.items()}
    rng = jax.random.key(3)
    args = (jax.numpy.float32(5.0), jax.numpy.float32(1.5), jax.numpy.int32(3))
    ours = np.asarray(generate(pipe.config, STEPS, pipe.params, batch, rng, *args))
    x_T = np.asarray(initial_noise(pipe.config, rng, 2))
    theirs = TorchSubjectDiffusion(folder)(batch, x_T, STEPS, 5.0, 1.5, subject_steps=3)
    assert ours.shape == theirs.shape == (2, 16, 16, 3)
    # uint8 images: float32 differences may flip a rounding, never more than a level or two.
    assert np.abs(ours.astype(int) - theirs).max() <= 2
    assert ours.std() > 1.0  # not a constant image


@pytest.mark.parametrize("exported", ["regions"], indirect=True)
def test_region_binding_reaches_the_exported_unet(exported):
    """The PyTorch processors bind each subject to its region: with the binding, a subject's
    grounding tokens change the UNet's output less than without (they reach fewer places)."""
    pipe, folder = exported
    model = TorchSubjectDiffusion(folder)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=gen)
    ctx = torch.randn(1, 24, 16, generator=gen)
    objs = torch.randn(1, 8, 16, generator=gen)
    moved = objs.clone()
    moved[:, 4:] = torch.randn(1, 4, 16, generator=gen)  # subject 1's tokens
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0, :8, :8] = 1.0
    masks[0, 1, 8:, 8:] = 1.0
    tokens = torch.full((1, 24), -1)

    def change(regions):
        model.binding.regions = regions
        with torch.no_grad():
            a, b = (
                model.unet(sample, 10, ctx, cross_attention_kwargs={"gligen": {"objs": o}}).sample
                for o in (objs, moved)
            )
        return (a - b).abs().amax(dim=1)[0]  # [H, W]

    free = change(None)
    bound = change((masks, torch.tensor([[True, True]]), tokens))
    model.binding.regions = None
    assert free.min() > 0 and bound.max() > 0
    # Subject 1's region is the bottom-right quarter: farthest from it, the change shrinks.
    assert bound[:4, :4].mean() < 0.5 * free[:4, :4].mean()
