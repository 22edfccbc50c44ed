"""The toy world's attribute reader: is there a subject in this box, and what shape, colour,
pattern is it? The judge behind `sdjax.eval.toy`'s fidelity and swap metrics.

Input: images uint8 `[B, R, R, 3]` (any R) and boxes `[B, 4]` (x1, y1, x2, y2 in [0, 1]).
Each box becomes a square crop around its centre, `context` times its longer side,
resampled to `crop` x `crop` pixels by a separable triangle filter (bilinear, widened to
antialias when shrinking; edges clamped), so the reader sees every subject at one scale.
A small CNN (a conv, group norm and SiLU per stage, 2x average pooling between stages,
then flatten and a dense layer) gives an objectness logit `[B]` and logits over the
world's shapes `[B, Ns]`, colours `[B, Nc]` and patterns `[B, Np]`.

Training data (`make_crop_set`): toy scenes of both splits, so every combination (one scene
in eight from the held-out split, its share of the combinations), rendered at 64 px and
bicubic-downscaled to `resolution` as the training loader does. Positives are the visible
subjects' boxes, jittered in scale and position while training (a generated subject rarely
fills its box exactly); negatives are boxes of the same sizes holding no subject pixel.
Each training scene is blurred, its channels scaled and noise added at random, so the
reader also reads imperfect generated subjects.

Weights ship in `sdjax/assets/toy_classifier/` (`config.json` + `params.safetensors`,
float16); `train_classifier(seed=...)` rebuilds them deterministically.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from sdjax.convert.files import (
    CheckpointError,
    read_json,
    read_safetensors,
    write_json,
    write_safetensors,
)
from sdjax.convert.keys import flat_to_tree, tree_to_flat
from sdjax.data.records import image_array, mask_array
from sdjax.data.toy import ToyWorld, make_scene
from sdjax.errors import UserError
from sdjax.models.layers import GroupNorm, conv, dense, unbox

DEFAULT_CLASSIFIER = os.path.join(os.path.dirname(__file__), "..", "assets", "toy_classifier")
FORMAT = "sdjax-toy-classifier"
ATTRIBUTES = ("shape", "colour", "pattern")
_SCENE_SIZE = 64  # toy scenes are rendered at this size, then downscaled like training data
_HELDOUT_EVERY = 8  # one scene in 8 from the held-out split
TRAIN_STEPS = 2500  # the shipped weights' schedule


@dataclass(frozen=True)
class ClassifierConfig:
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    patterns: tuple[str, ...]
    resolution: int = 32  # side of the scenes it was trained on
    crop: int = 24  # side of the crop the CNN sees
    context: float = 1.25  # crop side / the box's longer side
    channels: tuple[int, ...] = (16, 32, 64, 64)
    hidden: int = 96
    groups: int = 4

    @classmethod
    def for_world(cls, world: ToyWorld, **overrides) -> ClassifierConfig:
        return cls(world.shapes, world.colours, world.patterns, **overrides)

    def vocabulary(self, attribute: str) -> tuple[str, ...]:
        return {"shape": self.shapes, "colour": self.colours, "pattern": self.patterns}[attribute]

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        except TypeError as err:
            raise CheckpointError(f"toy classifier config: {err}") from None


class AttributeNet(nn.Module):
    """Crops `[B, C, C, 3]` in [-1, 1] -> {'object': [B], attribute: [B, K]} logits."""

    config: ClassifierConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        for i, channels in enumerate(cfg.channels):
            if i:
                x = nn.avg_pool(x, (2, 2), (2, 2))
            x = conv(channels, name=f"conv_{i}")(x)
            x = nn.silu(GroupNorm(cfg.groups, 1e-5, name=f"norm_{i}")(x))
        x = nn.silu(dense(cfg.hidden, name="hidden")(x.reshape(x.shape[0], -1)))
        logits = {"object": dense(1, name="object")(x)[:, 0]}
        for attribute in ATTRIBUTES:
            logits[attribute] = dense(len(cfg.vocabulary(attribute)), name=attribute)(x)
        return logits


def _resampling_weights(centres, side, size: int, extent: int):
    """`[B, size, extent]` weights of `size` samples spread over `side` pixels around
    `centres` `[B]` (pixel units): a triangle filter, widened when shrinking."""
    step = side / size  # [B]
    offsets = (jnp.arange(size) + 0.5) / size - 0.5
    points = jnp.clip(centres[:, None] + offsets[None] * side[:, None], 0.5, extent - 0.5)
    pixels = jnp.arange(extent) + 0.5
    width = jnp.maximum(step, 1.0)[:, None, None]
    w = jnp.maximum(0.0, 1.0 - jnp.abs(pixels[None, None] - points[..., None]) / width)
    return w / w.sum(-1, keepdims=True)


def crop_boxes(images, boxes, size: int, context: float):
    """Square crops of float images `[B, R, R, 3]` around boxes `[B, 4]` -> `[B, size, size, 3]`."""
    r = images.shape[1]
    boxes = boxes * r
    side = context * jnp.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    side = jnp.maximum(side, 1.0)
    wx = _resampling_weights((boxes[:, 0] + boxes[:, 2]) / 2, side, size, r)
    wy = _resampling_weights((boxes[:, 1] + boxes[:, 3]) / 2, side, size, r)
    return jnp.einsum("biy,byxc,bjx->bijc", wy, images, wx)


def _logits(config: ClassifierConfig, params, images, boxes):
    crops = crop_boxes(images, boxes, config.crop, config.context)
    return AttributeNet(config).apply({"params": params}, crops)


@partial(jax.jit, static_argnames="config")
def _predict(config: ClassifierConfig, params, images, boxes):
    logits = _logits(config, params, images.astype(jnp.float32) / 127.5 - 1.0, boxes)
    out = {"object": jax.nn.sigmoid(logits["object"])}
    out.update({a: jnp.argmax(logits[a], -1) for a in ATTRIBUTES})
    return out


@dataclass
class ToyClassifier:
    config: ClassifierConfig
    params: dict

    def predict(self, images, boxes, batch_size: int = 256) -> list[dict]:
        """Per box: {'present': bool, 'object': probability, 'shape'/'colour'/'pattern':
        name, or None where no subject is present}. images uint8 `[B, R, R, 3]`; run in
        batches of `batch_size` (the last one padded: one compile for any count)."""
        images, boxes = np.asarray(images, np.uint8), np.asarray(boxes, np.float32)
        count = len(images)
        pad = -count % batch_size
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)])
        boxes = np.concatenate([boxes, np.tile([[0.0, 0.0, 1.0, 1.0]], (pad, 1))])
        raw = [
            _predict(
                self.config, self.params, images[i : i + batch_size], boxes[i : i + batch_size]
            )
            for i in range(0, len(images), batch_size)
        ]
        raw = {k: np.concatenate([np.asarray(r[k]) for r in raw])[:count] for k in raw[0]}
        out = []
        for i in range(count):
            present = bool(raw["object"][i] >= 0.5)
            row = {"present": present, "object": float(raw["object"][i])}
            for a in ATTRIBUTES:
                row[a] = self.config.vocabulary(a)[raw[a][i]] if present else None
            out.append(row)
        return out


@dataclass
class CropSet:
    """Labelled boxes of toy scenes: scenes uint8 `[S, R, R, 3]`; per box `[M]`: its scene,
    box `[M, 4]` (fractions) and attribute indices `[M, 3]` (-1: a negative, no subject)."""

    scenes: np.ndarray
    scene: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


def _empty_box(covered: np.ndarray, side: float, rng) -> tuple | None:
    """A random square box of `side` (fraction) over no covered pixel, or None."""
    n = covered.shape[0]
    for x, y in rng.uniform(0.0, 1.0 - side, (20, 2)):
        rows = slice(int(y * n), math.ceil((y + side) * n))
        if not covered[rows, int(x * n) : math.ceil((x + side) * n)].any():
            return (x, y, x + side, y + side)
    return None


def make_crop_set(config: ClassifierConfig, n_scenes: int, seed: int) -> CropSet:
    """Scenes of the (seed) streams with every visible subject's box and one empty box."""
    world = ToyWorld(_SCENE_SIZE, config.shapes, config.colours, config.patterns)
    rng = np.random.default_rng([seed, 1])
    scenes, scene_of, boxes, labels = [], [], [], []
    for i in range(n_scenes):
        split = "heldout" if i % _HELDOUT_EVERY == 0 else "train"
        record = make_scene(world, i, seed, split)
        image = Image.fromarray(image_array(record))
        scenes.append(np.asarray(image.resize((config.resolution,) * 2, Image.BICUBIC)))
        covered = np.zeros((_SCENE_SIZE, _SCENE_SIZE), bool)
        for subject in record.subjects:
            covered |= mask_array(subject)
            boxes.append(np.asarray(subject.box, np.float32) / _SCENE_SIZE)
            labels.append([config.vocabulary(a).index(subject.attributes[a]) for a in ATTRIBUTES])
            scene_of.append(i)
        empty = _empty_box(covered, rng.uniform(0.2, 0.5), rng)
        if empty is not None:
            boxes.append(np.asarray(empty, np.float32))
            labels.append([-1, -1, -1])
            scene_of.append(i)
    return CropSet(
        np.stack(scenes), np.asarray(scene_of), np.stack(boxes), np.asarray(labels, np.int32)
    )


def _jitter(boxes: np.ndarray, positive: np.ndarray, rng) -> np.ndarray:
    """Positive boxes grown or shrunk (x0.85 .. x1.7, log-uniform) and shifted (12% of their
    size); a generated subject rarely fills its requested box exactly."""
    centre, size = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
    scale = np.exp(rng.uniform(np.log(0.85), np.log(1.7), (len(boxes), 1)))
    scale = scale * rng.uniform(0.92, 1.08, (len(boxes), 2))
    centre = centre + rng.uniform(-0.12, 0.12, (len(boxes), 2)) * size
    jittered = np.concatenate([centre - scale * size / 2, centre + scale * size / 2], 1)
    return np.where(positive[:, None], jittered, boxes).astype(np.float32)


def _augment(images, blur, gain, noise):
    """Float images `[B, R, R, 3]` in [-1, 1] blurred by a share `blur` `[B]` of a 3x3
    binomial filter, times `gain` `[B, 3]`, plus `noise` `[B, R, R, 3]`."""
    k = jnp.asarray([0.25, 0.5, 0.25])
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    rows = sum(k[i] * padded[:, i : i + images.shape[1]] for i in range(3))
    blurred = sum(k[i] * rows[:, :, i : i + images.shape[2]] for i in range(3))
    mixed = images + blur[:, None, None, None] * (blurred - images)
    return mixed * gain[:, None, None, :] + noise


def _loss(config: ClassifierConfig, params, images, boxes, labels):
    logits = _logits(config, params, images, boxes)
    positive = labels[:, 0] >= 0
    loss = optax.sigmoid_binary_cross_entropy(logits["object"], positive).mean()
    weight = positive / jnp.maximum(positive.sum(), 1)
    for i, attribute in enumerate(ATTRIBUTES):
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits[attribute], jnp.maximum(labels[:, i], 0)
        )
        loss = loss + (ce * weight).sum()
    return loss


def _batch(data: CropSet, batch_size: int, rng) -> dict:
    """A random training batch (host side): scenes, jittered boxes, labels, augmentation."""
    pick = rng.integers(len(data.boxes), size=batch_size)
    labels = data.labels[pick]
    r = data.scenes.shape[1]
    return {
        "scenes": data.scenes[data.scene[pick]],
        "boxes": _jitter(data.boxes[pick], labels[:, 0] >= 0, rng),
        "labels": labels,
        "blur": rng.uniform(0.0, 1.0, batch_size).astype(np.float32),
        "gain": rng.uniform(0.9, 1.1, (batch_size, 3)).astype(np.float32),
        "noise": (
            rng.uniform(0.0, 0.06, (batch_size, 1, 1, 1))
            * rng.standard_normal((batch_size, r, r, 3))
        ).astype(np.float32),
    }


def train_classifier(
    *,
    seed: int = 0,
    steps: int = TRAIN_STEPS,
    batch_size: int = 128,
    n_scenes: int = 6000,
    lr: float = 3e-3,
    config: ClassifierConfig | None = None,
    progress: bool = True,
    data: CropSet | None = None,
) -> tuple[ToyClassifier, list[float]]:
    """A classifier trained from scratch (deterministic for a seed) and its loss per step."""
    from tqdm import tqdm

    config = config or ClassifierConfig.for_world(ToyWorld())
    data = data or make_crop_set(config, n_scenes, seed)
    net = AttributeNet(config)
    crops = jnp.zeros((1, config.crop, config.crop, 3))
    params = unbox(jax.jit(net.init)(jax.random.key(seed), crops)["params"])
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps)
    tx = optax.adamw(schedule, weight_decay=1e-4)

    @jax.jit
    def step(params, opt_state, batch):
        images = _augment(
            batch["scenes"].astype(jnp.float32) / 127.5 - 1.0,
            batch["blur"],
            batch["gain"],
            batch["noise"],
        )
        loss, grads = jax.value_and_grad(partial(_loss, config))(
            params, images, batch["boxes"], batch["labels"]
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = tx.init(params), []
    rng = np.random.default_rng([seed, 2])
    for _ in tqdm(range(steps), desc="toy classifier", unit="step", disable=not progress):
        params, opt_state, loss = step(params, opt_state, _batch(data, batch_size, rng))
        losses.append(loss)  # not read back yet: the next batch is drawn while this step runs
    return ToyClassifier(config, jax.device_get(params)), [float(x) for x in losses]


def classifier_accuracy(classifier: ToyClassifier, data: CropSet) -> dict[str, float]:
    """Accuracy on clean boxes: per attribute and all three (on subjects, a missed subject
    counting wrong), subjects found ('present') and empty boxes rejected ('empty')."""
    preds = classifier.predict(data.scenes[data.scene], data.boxes)
    positive = data.labels[:, 0] >= 0
    vocab = [classifier.config.vocabulary(a) for a in ATTRIBUTES]
    right = np.asarray(
        [
            [p[a] == v[k] for a, v, k in zip(ATTRIBUTES, vocab, labels)]
            for p, labels in zip(preds, data.labels)
        ]
    )  # [M, 3]; only positives are read
    out = {a: float(right[positive, i].mean()) for i, a in enumerate(ATTRIBUTES)}
    out["all"] = float(right[positive].all(1).mean())
    present = np.asarray([p["present"] for p in preds])
    out["present"] = float(present[positive].mean())
    out["empty"] = float((~present[~positive]).mean())
    return out


def save_classifier(classifier: ToyClassifier, folder: str, info: dict | None = None) -> None:
    """`config.json` (+ `info`, e.g. how it was trained) and float16 `params.safetensors`."""
    os.makedirs(folder, exist_ok=True)
    flat = {k: v.astype(np.float16) for k, v in tree_to_flat(classifier.params).items()}
    write_safetensors(os.path.join(folder, "params.safetensors"), flat)
    meta = {"format": FORMAT, "config": dataclasses.asdict(classifier.config), **(info or {})}
    write_json(os.path.join(folder, "config.json"), meta)


def load_classifier(folder: str | None = None) -> ToyClassifier:
    """The shipped classifier (folder None) or one written by `save_classifier`."""
    folder = folder or DEFAULT_CLASSIFIER
    if not os.path.isdir(folder):
        raise UserError(f"toy classifier folder not found: {folder}")
    meta = read_json(os.path.join(folder, "config.json"))
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder}/config.json is not a {FORMAT} file")
    config = ClassifierConfig.from_dict(meta["config"])
    crops = jax.ShapeDtypeStruct((1, config.crop, config.crop, 3), jnp.float32)
    abstract = jax.eval_shape(AttributeNet(config).init, jax.random.key(0), crops)["params"]
    flat = read_safetensors(os.path.join(folder, "params.safetensors"))
    return ToyClassifier(config, flat_to_tree(flat, abstract, what=folder))
