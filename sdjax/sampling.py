"""Personalised text-to-image sampling: `sdjax.sample(pipeline, prompt, subjects, ...)`.

Everything after input preparation runs in ONE jitted call per batch: subject encoding,
the fusion text encoder, GroundingNet, the whole DDIM loop with three-branch guidance
(one UNet call per step on a 3B batch), and decoding. Prompts, subjects, seeds, scales
and the interpolation step are traced arguments, so only a new shape (batch, resolution,
step count) compiles again. On CPU the batch is split evenly over the JAX CPU devices
(`split_devices`; the CLI makes one per core).

Text-image interpolation (paper eq. 4): the first `subject_fraction` of the steps use the
subjects; the rest use the plain prompt with no subject conditioning.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from PIL import Image

from sdjax.compiler import known_options
from sdjax.conditioning import auto_boxes, mask_box, reference_image, subject_region
from sdjax.diffusion.ddim import sample_loop_indexed
from sdjax.diffusion.guidance import split_branches, stack_branches, three_branch_guidance
from sdjax.errors import InputWarning, UserError
from sdjax.pipeline import Pipeline
from sdjax.subject_diffusion import (
    ModelConfig,
    denoise,
    encode_prompt,
    encode_subjects,
    ground,
    subject_location,
    subject_regions,
    to_images,
)
from sdjax.subjects import Subject, check_box, load_subject


def prepare_inputs(pipeline: Pipeline, prompt: str, subjects: Sequence[Subject]) -> dict:
    """Host-side inputs of one image (numpy; see `generate` for the shapes)."""
    config, tok = pipeline.config, pipeline.tokenizer
    if len(subjects) > config.max_subjects:
        raise UserError(
            f"{len(subjects)} subjects, but this model takes at most {config.max_subjects}"
        )
    n, size = config.max_subjects, config.image.image_size
    refs = np.zeros((n, size, size, 3), np.float32)
    boxes, aspects, silhouettes = [], [], []
    for i, subject in enumerate(subjects):
        image, mask, outlined = load_subject(subject, i)
        refs[i] = reference_image(image, mask, size, config.image.mean, config.image.std)
        x1, y1, x2, y2 = mask_box(mask)
        aspects.append((x2 - x1) / (y2 - y1))
        silhouettes.append(mask[y1:y2, x1:x2] if outlined else None)
        boxes.append(
            None if subject.box is None else check_box(subject.box, f"subject {i + 1} box")
        )
    placed = auto_boxes(aspects, pipeline.config.auto_box_fill) if subjects else []
    box_array = np.zeros((n, 4), np.float32)
    regions = np.zeros((n, config.latent_size, config.latent_size), np.float32)
    for i, box in enumerate(boxes):
        box_array[i] = box if box is not None else placed[i]
        regions[i] = subject_region(box_array[i], config.latent_size, silhouettes[i])
    labels = [s.label.strip() for s in subjects]
    tokens = tok.prompt(prompt, labels, n)
    use_box = tokens.valid & (len(subjects) > 1 or config.single_subject_box)
    return {
        "ids": tokens.ids,
        "placeholders": tokens.placeholder_positions,
        "label_positions": tokens.label_positions,
        "valid": tokens.valid,
        "refs": refs,
        "boxes": box_array,
        "regions": regions,
        "use_box": use_box,
        "plain_ids": tok.plain(prompt),
        "empty_ids": tok.plain(""),
    }


def initial_noise(config: ModelConfig, rng, batch: int):
    """x_T `[B, h, h, C]`: image b of a batch starts from normal noise of `fold_in(rng, b)`."""
    keys = jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(batch))
    shape = (config.latent_size, config.latent_size, config.latent_channels)
    return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)


def split_devices(batch: int, devices=None) -> tuple:
    """The devices a batch of `batch` images is split over: the most of `devices`
    (default: the local ones) that divide it evenly. On CPU the CLI makes one device per
    core (`use_cpu_cores`): XLA's threads gain nothing on the small ops of a toy-size
    UNet, while devices run their shares of a batch side by side (BENCHMARKS.md)."""
    devices = tuple(jax.local_devices() if devices is None else devices)
    return devices[: math.gcd(batch, len(devices))]


# XLA's CPU fusion emitters take about 200 MB more memory to compile the sampler, for no
# speed (BENCHMARKS.md, "Sampler on CPU"). Newer XLA has no such option: it is passed only
# to a CPU compile, and only when this XLA knows it.
_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


@functools.cache
def sampler(platform: str):
    """The jitted sampler (`generate`'s computation) with `platform`'s compile options;
    static arguments: config, num_steps, devices."""
    options = known_options(_CPU_OPTIONS, jax.devices("cpu")[0]) if platform == "cpu" else {}
    return jax.jit(
        _generate,
        static_argnames=("config", "num_steps", "devices"),
        compiler_options=options or None,
    )


def generate(
    config: ModelConfig,
    num_steps: int,
    params,
    inputs,
    rng,
    text_scale,
    image_scale,
    subject_steps,
    devices=None,
):
    """Sample images for a batch of prepared inputs -> uint8 `[B, R, R, 3]`.

    inputs (B images, N slots, L tokens, S encoder size, h latent size): ids / plain_ids /
    empty_ids int32 `[B, L]`, placeholders / label_positions int32 `[B, N]`, valid /
    use_box bool `[B, N]`, refs `[B, N, S, S, 3]`, boxes `[B, N, 4]`, regions `[B, N, h, h]`
    (`conditioning.subject_region`). subject_steps: steps (from the first) that use
    the subjects. rng: a PRNG key; image b starts from noise of `fold_in(rng, b)`. The
    batch is split evenly over `split_devices(B, devices)` (parameters replicated); every
    image's result is its own. One compile per config, step count, batch and devices.
    """
    devices = split_devices(inputs["valid"].shape[0], devices)
    run = sampler(devices[0].platform)
    args = (params, inputs, rng, text_scale, image_scale, subject_steps)
    return run(config, num_steps, devices, *args)


def _generate(
    config: ModelConfig,
    num_steps: int,
    devices: tuple,
    params,
    inputs,
    rng,
    text_scale,
    image_scale,
    subject_steps,
):
    batch = inputs["valid"].shape[0]
    x_T = initial_noise(config, rng, batch)
    run = partial(_generate_from, config, num_steps)
    if len(devices) > 1:
        run = jax.shard_map(
            run,
            mesh=Mesh(np.asarray(devices), ("batch",)),
            in_specs=(P(), P("batch"), P("batch"), P(), P(), P()),
            out_specs=P("batch"),
        )
    return run(params, inputs, x_T, text_scale, image_scale, subject_steps)


def _generate_from(
    config: ModelConfig, num_steps: int, params, inputs, x_T, text_scale, image_scale, subject_steps
):
    """`generate` for the images whose starting noise is x_T `[B, h, h, C]`."""
    patches, cls = encode_subjects(config, params, inputs["refs"])
    valid, none = inputs["valid"], inputs["valid"] & False
    # One text-encoder pass for the three prompts and one GroundingNet pass for the
    # subjects and their null tokens: each model is compiled once, not two or three times.
    ctx_subject, ctx_plain, ctx_empty = split_branches(
        encode_prompt(
            config,
            params,
            stack_branches(inputs["ids"], inputs["plain_ids"], inputs["empty_ids"]),
            stack_branches(cls, cls, cls),
            stack_branches(*[inputs["placeholders"]] * 3),
            stack_branches(valid, none, none),
        )
    )
    objs, null_objs = split_branches(
        ground(
            config,
            params,
            stack_branches(patches, patches),
            stack_branches(inputs["boxes"], inputs["boxes"]),
            stack_branches(valid, none),
            stack_branches(inputs["use_box"], none),
        ),
        count=2,
    )
    loc = subject_location(config, inputs["boxes"], valid)
    no_loc = jnp.zeros_like(loc)  # a dropped location mask is all zeros (docs/method.md §3a)
    # Branches [text + subjects | empty text + subjects | unconditional]: the subjects'
    # tokens are bound to their regions where they are present.
    positions = inputs["placeholders"], inputs["label_positions"]

    def bound(objs_valid, text_valid):
        return subject_regions(config, inputs["regions"], objs_valid, *positions, text_valid)

    def guided(x, t, i):
        with_subjects = i < subject_steps
        ctx = jnp.where(with_subjects, ctx_subject, ctx_plain)
        o = jnp.where(with_subjects, objs, null_objs)
        lm = jnp.where(with_subjects, loc, no_loc)
        on = valid & with_subjects
        regions = jax.tree.map(
            lambda *r: stack_branches(*r), bound(on, on), bound(on, none), bound(none, none)
        )
        out = denoise(
            config,
            params,
            stack_branches(x, x, x),
            stack_branches(t, t, t),
            stack_branches(ctx, ctx_empty, ctx_empty),
            stack_branches(o, o, null_objs),
            stack_branches(lm, lm, no_loc),
            regions=regions,
        )
        return three_branch_guidance(*split_branches(out), text_scale, image_scale)

    x0 = sample_loop_indexed(guided, x_T, num_steps=num_steps, schedule=config.noise.schedule())
    images = to_images(config, params, x0)
    return jnp.round((images + 1.0) * 127.5).astype(jnp.uint8)


_ON_PLATFORM = weakref.WeakKeyDictionary()


def for_platform(pipeline: Pipeline, platform: str) -> Pipeline:
    """The pipeline as `platform` samples it: on CPU as it is; on an accelerator in
    bfloat16 (`bfloat16_model`: weights and matmuls; norms, softmax statistics, the
    scheduler's math and the output stay float32), made once per pipeline."""
    if platform == "cpu":
        return pipeline
    if pipeline not in _ON_PLATFORM:
        config = bfloat16_model(pipeline.config)
        params = jax.tree.map(_to_bfloat16, pipeline.params)
        _ON_PLATFORM[pipeline] = Pipeline(config, params, pipeline.tokenizer)
    return _ON_PLATFORM[pipeline]


def bfloat16_model(config: ModelConfig) -> ModelConfig:
    """The model config with every part computing in bfloat16."""
    parts = {"unet": config.unet, "text": config.text, "image": config.image, "vae": config.vae}
    return dataclasses.replace(
        config,
        **{k: dataclasses.replace(v, dtype="bfloat16") for k, v in parts.items() if v is not None},
    )


def _to_bfloat16(x):
    return jnp.asarray(x, jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x


def guidance_scales(
    config: ModelConfig, text_scale: float | None, image_scale: float | None
) -> tuple[float, float]:
    """The scales to sample with: as given, or the model's defaults where None."""
    return (
        config.text_scale if text_scale is None else text_scale,
        config.image_scale if image_scale is None else image_scale,
    )


def check_settings(
    num_steps: int,
    text_scale: float | None,
    image_scale: float | None,
    num_images: int,
    subject_fraction: float,
) -> None:
    """Sampler settings, checked before any model is loaded (a None scale: the model's)."""
    if num_steps < 1:
        raise UserError(f"steps must be at least 1, got {num_steps}")
    for name, scale in (("text", text_scale), ("image", image_scale)):
        if scale is not None and not math.isfinite(scale):
            raise UserError(f"{name} guidance scale must be a finite number, got {scale}")
        if scale is not None and scale < 0:
            raise UserError(
                f"guidance scales must be >= 0, got text {text_scale}, image {image_scale}"
            )
    if num_images < 1:
        raise UserError(f"num-images must be at least 1, got {num_images}")
    if not 0.0 <= subject_fraction <= 1.0:  # False for NaN too
        raise UserError(f"subject fraction must be in [0, 1], got {subject_fraction}")


def check_steps(config: ModelConfig, num_steps: int) -> None:
    """DDIM steps the model's noise schedule has room for."""
    levels = config.noise.num_train_timesteps
    if not 1 <= num_steps <= levels:
        raise UserError(
            f"steps must be in 1..{levels} (this model's noise levels), got {num_steps}"
        )


def prompt_problems(pipeline: Pipeline, prompt: str, subjects: Sequence[Subject]) -> list[str]:
    """What the model will not read as written (`Tokenizer.problems`): unknown words (with
    the words the embedded toy model knows) and a prompt cut to fit."""
    tokenizer, known = pipeline.tokenizer, ""
    if tokenizer.vocab_subset is not None:
        from sdjax.data.toy import vocabulary
        from sdjax.tokenizer import Tokenizer

        words = vocabulary()
        toy = Tokenizer.for_vocabulary(words, tokenizer.max_length)
        if toy.vocab_subset == tokenizer.vocab_subset:
            known = f"; it knows only the toy world's words: {', '.join(words)}"
    labels = [s.label.strip() for s in subjects if isinstance(s.label, str)]
    return tokenizer.problems(prompt, labels, known)


def sample(
    pipeline: Pipeline,
    prompt: str,
    subjects: Sequence[Subject],
    *,
    seed: int = 0,
    num_steps: int = 50,
    text_scale: float | None = None,
    image_scale: float | None = None,
    num_images: int = 1,
    subject_fraction: float = 1.0,
    batch_size: int = 8,
    strict: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """Generate `num_images` images of `subjects` in the scene `prompt` (see module doc).
    Guidance scales left as None are the model's (`ModelConfig.text_scale`, `.image_scale`).
    Words the model does not know and a prompt cut to fit are an `InputWarning` each, or
    with `strict` a `UserError`. Images are drawn `batch_size` at a time (one compiled call
    each); `progress(done, num_images)` is called after each."""
    check_settings(num_steps, text_scale, image_scale, num_images, subject_fraction)
    check_steps(pipeline.config, num_steps)
    text_scale, image_scale = guidance_scales(pipeline.config, text_scale, image_scale)
    one = prepare_inputs(pipeline, prompt, subjects)
    for problem in prompt_problems(pipeline, prompt, subjects):
        if strict:
            raise UserError(problem)
        warnings.warn(problem, InputWarning, stacklevel=2)
    pipeline = for_platform(pipeline, jax.default_backend())
    subject_steps = math.floor(subject_fraction * num_steps + 0.5)
    rng = jax.random.key(seed)
    images = []
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        batch = {k: np.broadcast_to(v, (count, *v.shape)) for k, v in one.items()}
        out = generate(
            pipeline.config,
            num_steps,
            pipeline.params,
            batch,
            jax.random.fold_in(rng, start),
            jnp.float32(text_scale),
            jnp.float32(image_scale),
            jnp.int32(subject_steps),
        )
        images.extend(Image.fromarray(a) for a in np.asarray(out))
        if progress is not None:
            progress(len(images), num_images)
    return images
