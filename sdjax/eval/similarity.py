"""DreamBench's scores (docs/method.md §7): DINO, CLIP-I and CLIP-T, with the references'
preprocessing.

- DINO: mean cosine similarity of DINO ViT CLS features over all (generated, real) pairs.
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: mean over generated images of the cosine similarity between the image's CLIP
  embedding and its prompt's (the prompt with the class noun, as token ids).
A model is a `(config, params)` pair from `sdjax.eval.metric_models` (`load_dino`,
`load_clip`); images are PIL images or paths.

Preprocessing is the references' torchvision chain on PIL images, rebuilt from the PIL
operations torchvision runs (torchvision is not a dependency):
  DINO  convert("RGB"), Resize(256, BICUBIC), CenterCrop(224), ToTensor, Normalize(ImageNet)
  CLIP  Resize(S, BICUBIC), CenterCrop(S), convert("RGB"), ToTensor, Normalize(CLIP)
        (OpenAI CLIP's and open_clip's eval transform; S = the model's image_size)
where, for a PIL image, torchvision's
  Resize(n)     sets the shorter side to n and the longer to int(n * long / short) with
                `image.resize((w, h), BICUBIC)` (PIL always antialiases; an image already
                that size is returned as it is);
  CenterCrop(n) is `image.crop((left, top, left + n, top + n))` with
                top = int(round((h - n) / 2.0)) (Python's round, half to even), left alike;
  ToTensor      is uint8 / 255 in float32, Normalize `(x - mean) / std` in float32.
A DINO model smaller than 224 px keeps the protocol's resize-to-crop ratio, 256 / 224.
Arrays are NHWC float32.

Features come from one jitted function per model config, run on fixed-size batches (the
last one zero-padded), so any number of images compiles once.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from PIL import Image

from sdjax.models.clip import CLIPVisionConfig
from sdjax.models.clip_model import CLIPConfig, CLIPModel
from sdjax.models.vit import ViT, ViTConfig

ImageLike = Image.Image | str | os.PathLike
DINO_RESIZE, DINO_CROP = 256, 224
BATCH_SIZE = 16


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """torchvision `Resize(size, BICUBIC)` of a PIL image: the shorter side becomes `size`."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision `CenterCrop(size)` of a PIL image at least `size` on each side."""
    w, h = image.size
    if size > min(w, h):
        raise ValueError(f"cannot center-crop {size}x{size} from a {w}x{h} image")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalise(image: Image.Image, mean, std) -> np.ndarray:
    """torchvision `ToTensor` then `Normalize(mean, std)`, as an HWC float32 array."""
    x = np.asarray(image, np.float32) / np.float32(255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess_dino(images: Sequence[ImageLike], config: ViTConfig) -> np.ndarray:
    """DINO's evaluation transform: `[N, S, S, 3]`, S = config.image_size (224)."""
    return np.stack([_dino_transform(_open(image), config) for image in images])


def preprocess_clip(images: Sequence[ImageLike], config: CLIPVisionConfig) -> np.ndarray:
    """CLIP's evaluation transform: `[N, S, S, 3]`, S = config.image_size."""
    return np.stack([_clip_transform(_open(image), config) for image in images])


def _dino_transform(image: Image.Image, config: ViTConfig) -> np.ndarray:
    crop = config.image_size
    image = resize_shorter(image.convert("RGB"), crop * DINO_RESIZE // DINO_CROP)
    return normalise(center_crop(image, crop), config.mean, config.std)


def _clip_transform(image: Image.Image, config: CLIPVisionConfig) -> np.ndarray:
    size = config.image_size
    image = center_crop(resize_shorter(image, size), size).convert("RGB")
    return normalise(image, config.mean, config.std)


def _open(image: ImageLike) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.open(image)


def batched(fn: Callable, params, inputs: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """`fn(params, chunk)` over `inputs [N, ...]` in chunks of exactly `batch_size` rows
    (the last zero-padded, its padding rows dropped) -> float32 `[N, ...]`."""
    n = len(inputs)
    padding = np.zeros((-n % batch_size, *inputs.shape[1:]), inputs.dtype)
    padded = np.concatenate([inputs, padding])
    params = jax.device_put(params)  # once, not once per chunk
    chunks = [fn(params, padded[i : i + batch_size]) for i in range(0, len(padded), batch_size)]
    return np.concatenate([np.asarray(c, np.float32) for c in chunks])[:n]


@functools.cache
def _dino_fn(config: ViTConfig):
    return jax.jit(lambda params, images: ViT(config).apply({"params": params}, images)[1])


@functools.cache
def _clip_fn(config: CLIPConfig, method: str):
    return jax.jit(lambda params, x: CLIPModel(config).apply({"params": params}, x, method=method))


def dino_features(model, images: Sequence[ImageLike], *, batch_size=BATCH_SIZE) -> np.ndarray:
    """DINO CLS features `[N, D]` of images."""
    config, params = model
    return batched(_dino_fn(config), params, preprocess_dino(images, config), batch_size)


def clip_image_features(model, images: Sequence[ImageLike], *, batch_size=BATCH_SIZE):
    """CLIP image embeddings `[N, E]` of images."""
    config, params = model
    inputs = preprocess_clip(images, config.vision)
    return batched(_clip_fn(config, "image_embeds"), params, inputs, batch_size)


def clip_text_features(model, input_ids: np.ndarray, *, batch_size=BATCH_SIZE) -> np.ndarray:
    """CLIP text embeddings `[N, E]` of token ids int32 `[N, L]`."""
    config, params = model
    ids = np.asarray(input_ids, np.int32)
    return batched(_clip_fn(config, "text_embeds"), params, ids, batch_size)


def mean_pairwise_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity over all pairs of rows of `a [N, D]` and `b [M, D]`."""
    return float((_unit(a) @ _unit(b).T).mean())


def mean_paired_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of row i of `a [N, D]` with row i of `b [N, D]`."""
    return float((_unit(a) * _unit(b)).sum(-1).mean())


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def dino_similarity(model, generated, real, *, batch_size=BATCH_SIZE) -> float:
    """DreamBench's DINO score of generated images against a subject's real images."""
    features = (dino_features(model, x, batch_size=batch_size) for x in (generated, real))
    return mean_pairwise_cosine(*features)


def clip_i(model, generated, real, *, batch_size=BATCH_SIZE) -> float:
    """DreamBench's CLIP-I score of generated images against a subject's real images."""
    features = (clip_image_features(model, x, batch_size=batch_size) for x in (generated, real))
    return mean_pairwise_cosine(*features)


def clip_t(model, generated, input_ids, *, batch_size=BATCH_SIZE) -> float:
    """DreamBench's CLIP-T score: generated images `[N]` against their prompts.

    input_ids: int `[N, L]`, each image's prompt (with the class noun) in CLIP BPE ids:
    BOS, tokens, EOS, padding, L at most the text tower's `max_position_embeddings`.
    """
    if len(generated) != len(input_ids):
        raise ValueError(f"{len(generated)} images but {len(input_ids)} prompts")
    images = clip_image_features(model, generated, batch_size=batch_size)
    return mean_paired_cosine(images, clip_text_features(model, input_ids, batch_size=batch_size))
