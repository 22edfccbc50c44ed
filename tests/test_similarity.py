"""DreamBench scores (DINO, CLIP-I, CLIP-T) and their preprocessing.

- Preprocessing of a real DreamBench photo (square, cut landscape and portrait so that
  the center crop lands on a half pixel, and grayscale) equals, bit for bit, the
  torchvision chain written out here with PIL and torch as torchvision runs it on PIL
  images; CLIP's also matches transformers' `CLIPImageProcessor` (an independent
  implementation) to 1e-6.
- Scores from tiny random models (transformers `ViTModel` / `CLIPModel`, saved and loaded
  by our loaders) equal the same cosine statistics computed in PyTorch with the
  reference models on the same preprocessed images (features to 1e-4 relative).
- Ragged inputs run in fixed-size batches: one trace for any number of inputs.
"""

import os

import jax
import numpy as np
import pytest
import torch
import transformers
from parity import assert_parity, nchw, randomise_
from PIL import Image

from sdjax.eval.metric_models import load_clip, load_dino
from sdjax.eval.similarity import (
    batched,
    clip_i,
    clip_image_features,
    clip_t,
    clip_text_features,
    dino_features,
    dino_similarity,
    preprocess_clip,
    preprocess_dino,
)
from sdjax.models.clip import CLIP_MEAN, CLIP_STD, CLIPVisionConfig
from sdjax.models.vit import IMAGENET_MEAN, IMAGENET_STD, ViTConfig

SCORE_TOL = 1e-5  # absolute, on cosine similarities in [-1, 1]


def _torchvision_resize(image, n):
    """torchvision.transforms.functional.resize(image, n, BICUBIC) on a PIL image."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = n, int(n * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image if (new_w, new_h) == (w, h) else image.resize((new_w, new_h), Image.BICUBIC)


def _torchvision_chain(image, resize, crop, mean, std, rgb_first):
    """Resize, CenterCrop, (convert RGB), ToTensor, Normalize as torchvision runs them."""
    if rgb_first:
        image = image.convert("RGB")
    image = _torchvision_resize(image, resize)
    top = int(round((image.height - crop) / 2.0))
    left = int(round((image.width - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop)).convert("RGB")
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    tensor = (tensor - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return tensor.permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def photos(shared_data):
    """A real DreamBench photo (512 x 512), cut to 512 x 301 and 301 x 512, and in gray."""
    photo = Image.open(os.path.join(shared_data, "dreambench", "dog", "00.jpg"))
    photo.load()
    return {
        "square": photo,
        "landscape": photo.crop((0, 100, 512, 401)),
        "portrait": photo.crop((100, 0, 401, 512)),
        "gray": photo.crop((0, 0, 512, 400)).convert("L"),
    }


def test_dino_preprocessing_matches_torchvision(photos):
    config = ViTConfig()
    assert (config.image_size, config.mean, config.std) == (224, IMAGENET_MEAN, IMAGENET_STD)
    ours = preprocess_dino(list(photos.values()), config)
    assert ours.shape == (4, 224, 224, 3) and ours.dtype == np.float32
    for got, image in zip(ours, photos.values()):
        want = _torchvision_chain(image, 256, 224, IMAGENET_MEAN, IMAGENET_STD, rgb_first=True)
        np.testing.assert_array_equal(got, want)


def test_clip_preprocessing_matches_torchvision_and_transformers(photos):
    config = CLIPVisionConfig()
    ours = preprocess_clip(list(photos.values()), config)
    assert ours.shape == (4, 224, 224, 3)
    processor = transformers.CLIPImageProcessor()  # OpenAI CLIP's: 224, bicubic, CLIP stats
    for got, image in zip(ours, photos.values()):
        want = _torchvision_chain(image, 224, 224, CLIP_MEAN, CLIP_STD, rgb_first=False)
        np.testing.assert_array_equal(got, want)
        theirs = processor(images=image, return_tensors="np").pixel_values[0].transpose(1, 2, 0)
        np.testing.assert_allclose(got, theirs, atol=1e-6, rtol=0)


def _synthetic_images(sizes, seed):
    """Smooth random RGB images of the given (width, height)s."""
    rng = np.random.default_rng(seed)
    images = []
    for w, h in sizes:
        coarse = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
    return images


# Five generated images (ragged against batch size 2) and three real ones, all sizes.
GENERATED = _synthetic_images([(40, 48), (64, 40), (33, 33), (50, 37), (36, 60)], seed=0)
REAL = _synthetic_images([(48, 48), (70, 40), (40, 52)], seed=1)
BATCH = 2


def _pairwise(a, b):
    a, b = (torch.nn.functional.normalize(torch.as_tensor(x), dim=-1) for x in (a, b))
    return float((a @ b.T).mean())


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    """(transformers ViTModel without pooler, our loaded (config, params))."""
    config = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    ref = randomise_(transformers.ViTModel(config, add_pooling_layer=False)).eval()
    folder = str(tmp_path_factory.mktemp("dino"))
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, load_dino(folder)


def test_dino_similarity_matches_pytorch(dino):
    ref, model = dino
    with torch.no_grad():
        gen, real = (
            ref(pixel_values=nchw(preprocess_dino(x, model[0]))).last_hidden_state[:, 0]
            for x in (GENERATED, REAL)
        )
    assert_parity(dino_features(model, GENERATED, batch_size=BATCH), gen.numpy())
    score = dino_similarity(model, GENERATED, REAL, batch_size=BATCH)
    assert abs(score - _pairwise(gen, real)) <= SCORE_TOL


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(transformers CLIPModel, our loaded (config, params))."""
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.CLIPConfig(
        text_config=dict(tower, vocab_size=1000, max_position_embeddings=16, eos_token_id=2),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=24,
    )
    ref = randomise_(transformers.CLIPModel(config)).eval()
    folder = str(tmp_path_factory.mktemp("clip"))
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, load_clip(folder)


def _prompt_ids(n, seed=2):
    """n prompts: BOS 997, 3-12 words, EOS 999 (the largest id), zero padding; `[n, 16]`."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, 16), np.int32)
    for row in range(n):
        words = rng.integers(3, 13)
        ids[row, : words + 2] = [997, *rng.integers(3, 900, words), 999]
    return ids


def _clip_reference_images(ref, model, images):
    with torch.no_grad():
        return ref.get_image_features(pixel_values=nchw(preprocess_clip(images, model[0].vision)))


def test_clip_i_matches_pytorch(clip):
    ref, model = clip
    gen, real = (_clip_reference_images(ref, model, x) for x in (GENERATED, REAL))
    assert_parity(clip_image_features(model, GENERATED, batch_size=BATCH), gen.numpy())
    score = clip_i(model, GENERATED, REAL, batch_size=BATCH)
    assert abs(score - _pairwise(gen, real)) <= SCORE_TOL


def test_clip_t_matches_pytorch(clip):
    ref, model = clip
    ids = _prompt_ids(len(GENERATED))
    with torch.no_grad():
        text = ref.get_text_features(input_ids=torch.from_numpy(ids).long())
    image = _clip_reference_images(ref, model, GENERATED)
    assert_parity(clip_text_features(model, ids, batch_size=BATCH), text.numpy())
    paired = torch.nn.functional.cosine_similarity(image, text, dim=-1).mean()
    assert abs(clip_t(model, GENERATED, ids, batch_size=BATCH) - float(paired)) <= SCORE_TOL
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        clip_t(model, GENERATED, ids[:4])


def test_ragged_inputs_trace_once():
    traces = []

    def fn(scale, x):
        traces.append(x.shape)
        return x.sum(axis=(1, 2)) * scale

    inputs = np.arange(5 * 3 * 2, dtype=np.float32).reshape(5, 3, 2)
    out = batched(jax.jit(fn), np.float32(2), inputs, batch_size=2)
    assert traces == [(2, 3, 2)]
    np.testing.assert_array_equal(out, inputs.sum(axis=(1, 2)) * 2)
