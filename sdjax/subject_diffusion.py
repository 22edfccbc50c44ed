"""The Subject-Diffusion model: its parts, its config, and its forward pass as pure functions.

Parts (params dict keys): `unet`, `text_encoder` (fusion CLIP text), `image_encoder`
(frozen CLIP vision), `grounding` (GroundingNet), `cls_mlp`, and `vae` (absent for a
pixel-space model such as the toy one). The forward pieces, shared by the sampler and the
trainer (B batch, N subject slots, S encoder image size, L tokens, h latent size):

    encode_subjects(refs [B,N,S,S,3])            -> patches [B,N,P,Dp], cls [B,N,Di]
    encode_prompt(ids [B,L], cls, positions, valid) -> context [B,L,Dt]
    ground(patches, boxes [B,N,4], valid, use_box) -> objs [B,N*P,Dc]
    subject_regions(masks [B,N,h,h], objs_bound [B,N], placeholders, labels, text_bound) -> Regions
    denoise(x_t [B,h,h,C], t [B], context, objs, loc [B,h,h,1], probe, regions)
        -> output [B,h,h,C]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sdjax.conditioning import location_mask
from sdjax.diffusion.schedules import Schedule, make_schedule
from sdjax.errors import UserError
from sdjax.models.clip import CLIPTextConfig, CLIPVisionConfig
from sdjax.models.clip_text import TextEncoder
from sdjax.models.clip_vision import ImageEncoder
from sdjax.models.grounding import ClsMLP, GroundingNet
from sdjax.models.kernels import IMPLEMENTATIONS
from sdjax.models.regions import Regions, token_subjects
from sdjax.models.unet import UNet
from sdjax.models.unet_config import UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig

PARTS = ("unet", "text_encoder", "image_encoder", "grounding", "cls_mlp", "vae")


@dataclass(frozen=True)
class NoiseConfig:
    """The training noise schedule, as diffusers' scheduler_config.json spells it."""

    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    set_alpha_to_one: bool = False

    def schedule(self) -> Schedule:
        fields = dataclasses.asdict(self)
        return make_schedule(fields.pop("beta_schedule"), **fields)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes a Subject-Diffusion model's computation.

    resolution: output image size in pixels. max_subjects: subject slots N.
    vocab_subset: CLIP ids the text encoder knows (None: the whole CLIP vocabulary).
    single_subject_box: give GroundingNet box coordinates when only one subject is shown
    (the authors turn them off; docs/method.md §3b). auto_box_fill: how much of the image the
    sampler's automatic boxes span (`conditioning.auto_boxes`); set it near the size of the
    subjects the model was trained on. text_scale / image_scale: the guidance scales the
    sampler uses when not told (the paper's 7.5 / 1.5; a small model may want less).

    Ablations (docs/method.md §7; all on in the method): location_control feeds the location mask
    (off: the channel is always the dropped, all-zero mask); box_coordinates gives
    GroundingNet the boxes (off: never); cls_feature fuses each subject's CLS embedding at
    its placeholder token (off: the text encoder reads the prompt alone).

    region_attention (beyond the paper; `sdjax.models.regions`): each subject's grounding
    tokens and its placeholder and label tokens are attended only inside its region.
    Off in models saved before it existed; the configs turn it on.

    attention: the attention kernel of the UNet and the CLIP towers
    (`sdjax.models.kernels`): "auto" (by backend: TPU splash, GPU cuDNN, CPU XLA), "xla",
    "cudnn" or "splash". It changes how attention is computed, not what.
    """

    unet: UNetConfig
    text: CLIPTextConfig
    image: CLIPVisionConfig
    vae: VAEConfig | None = None
    noise: NoiseConfig = NoiseConfig()
    resolution: int = 512
    max_subjects: int = 2
    grounding_hidden: int = 1024
    vocab_subset: tuple[int, ...] | None = None
    single_subject_box: bool = False
    auto_box_fill: float = 0.75
    text_scale: float = 7.5
    image_scale: float = 1.5
    location_control: bool = True
    box_coordinates: bool = True
    cls_feature: bool = True
    region_attention: bool = False
    attention: str = "auto"

    def __post_init__(self):
        channels = self.vae.latent_channels if self.vae else 3
        if self.unet.in_channels != channels + 1 or self.unet.out_channels != channels:
            raise UserError(
                f"model config: the UNet needs {channels}+1 input and {channels} output "
                f"channels (latents + location mask), has {self.unet.in_channels}/"
                f"{self.unet.out_channels}"
            )
        if self.attention not in IMPLEMENTATIONS:
            raise UserError(
                f"model config: attention {self.attention!r}; known: {', '.join(IMPLEMENTATIONS)}"
            )
        if self.resolution % self.downscale:
            raise UserError(
                f"model config: resolution {self.resolution} is not a multiple "
                f"of the VAE's downscale {self.downscale}"
            )

    @property
    def ablated(self) -> list[str]:
        """The ablation switches turned off (empty for the method itself)."""
        return [
            name
            for name in ("location_control", "box_coordinates", "cls_feature")
            if not getattr(self, name)
        ]

    @property
    def downscale(self) -> int:
        return self.vae.downscale if self.vae else 1

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downscale

    @property
    def latent_channels(self) -> int:
        return self.unet.out_channels

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        parts = {
            "unet": UNetConfig,
            "text": CLIPTextConfig,
            "image": CLIPVisionConfig,
            "vae": VAEConfig,
            "noise": NoiseConfig,
        }
        fields = {}
        for key, value in d.items():
            if key in parts and value is not None:
                value = parts[key](**_tuples(value))
            fields[key] = _tuples(value)
        try:
            return cls(**fields)
        except TypeError as err:
            raise UserError(f"model config: {err}") from None


def _tuples(value):
    """JSON lists back to the tuples frozen configs hold (recursively)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def modules(config: ModelConfig) -> dict:
    """The Flax modules of each part (the UNet and the CLIP towers attend with
    `config.attention`)."""
    attention = {"attention_implementation": config.attention}
    parts = {
        "unet": UNet(dataclasses.replace(config.unet, **attention)),
        "text_encoder": TextEncoder(dataclasses.replace(config.text, **attention)),
        "image_encoder": ImageEncoder(dataclasses.replace(config.image, **attention)),
        "grounding": GroundingNet(config.unet.objs_dim, config.grounding_hidden),
        "cls_mlp": ClsMLP(config.text.hidden_size),
    }
    if config.vae is not None:
        parts["vae"] = AutoencoderKL(config.vae, jnp.dtype(config.vae.dtype))
    return parts


def example_inputs(config: ModelConfig, batch: int = 1) -> dict:
    """Zero inputs of each part's forward, for initialisation and shape inference."""
    n, img = config.max_subjects, config.image
    patches = jnp.zeros((batch, n, img.num_patches, img.hidden_size))
    h = config.latent_size
    inputs = {
        "unet": (
            jnp.zeros((batch, h, h, config.unet.in_channels)),
            jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, config.text.max_position_embeddings, config.text.hidden_size)),
            jnp.zeros((batch, n * img.num_patches, config.unet.objs_dim)),
        ),
        "text_encoder": (jnp.zeros((batch, config.text.max_position_embeddings), jnp.int32),),
        "image_encoder": (jnp.zeros((batch, img.image_size, img.image_size, 3)),),
        "grounding": (patches, jnp.zeros((batch, n, 4)), jnp.ones((batch, n), bool)),
        "cls_mlp": (jnp.zeros((batch, n, img.projection_dim)),),
    }
    if config.vae is not None:
        inputs["vae"] = (jnp.zeros((batch, config.resolution, config.resolution, 3)),)
    return inputs


def init_params(config: ModelConfig, rng) -> dict:
    """Fresh parameters of every part (with logical-axis metadata)."""
    mods, inputs = modules(config), example_inputs(config)
    keys = jax.random.split(rng, len(mods))
    return {name: mods[name].init(key, *inputs[name])["params"] for name, key in zip(mods, keys)}


def abstract_params(config: ModelConfig) -> dict:
    """Shapes (and logical axes) of every part's parameters, without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def encode_subjects(config: ModelConfig, params, refs):
    """Reference images `[B, N, S, S, 3]` -> patch tokens `[B, N, P, Dp]`, CLS `[B, N, Di]`."""
    b, n = refs.shape[:2]
    patches, cls = modules(config)["image_encoder"].apply(
        {"params": params["image_encoder"]}, refs.reshape(b * n, *refs.shape[2:])
    )
    return patches.reshape(b, n, *patches.shape[1:]), cls.reshape(b, n, -1)


def encode_prompt(config: ModelConfig, params, ids, cls=None, positions=None, valid=None):
    """Token ids `[B, L]` -> text context `[B, L, D]`; with `cls` `[B, N, Di]` each valid
    subject's CLS MLP embedding replaces its placeholder token (positions `[B, N]`)."""
    mods = modules(config)
    embeds = None
    if cls is not None and config.cls_feature:
        embeds = mods["cls_mlp"].apply({"params": params["cls_mlp"]}, cls)
    hidden, _ = mods["text_encoder"].apply(
        {"params": params["text_encoder"]}, ids, embeds, positions, valid
    )
    return hidden


def ground(config: ModelConfig, params, patches, boxes, valid, use_box):
    """GroundingNet tokens `[B, N*P, D]` (null features in invalid slots)."""
    use_box = use_box & config.box_coordinates
    return modules(config)["grounding"].apply(
        {"params": params["grounding"]}, patches, boxes, valid, use_box
    )


def subject_location(config: ModelConfig, boxes, valid):
    """The location-mask input `[B, h, h, 1]` of boxes `[B, N, 4]` (`location_mask`), or the
    dropped, all-zero mask in a model without location control."""
    loc = location_mask(boxes, valid, config.latent_size)
    return loc if config.location_control else jnp.zeros_like(loc)


def subject_regions(config: ModelConfig, masks, objs_bound, placeholders, labels, text_bound):
    """The subjects' regions for region-bound attention, or None in a model without it.

    masks `[B, N, h, h]` (each subject's region at the latent size), objs_bound `[B, N]`
    (its grounding tokens are real, not null), placeholders / labels `[B, N]` (its token
    positions) and text_bound `[B, N]` (they are in the prompt)."""
    if not config.region_attention:
        return None
    tokens = token_subjects(placeholders, labels, text_bound, config.text.max_position_embeddings)
    return Regions(masks.astype(jnp.float32), objs_bound, tokens)


def denoise(config: ModelConfig, params, x_t, t, context, objs, loc, probe=None, regions=None):
    """The UNet on [x_t, location mask]: `[B, h, h, C]` -> model output `[B, h, h, C]`.

    With `probe` (int `[B, K]` token positions) also returns the sown cross-attention maps.
    `regions` (`subject_regions`, or None) binds the subjects' tokens to their regions.
    """
    unet = modules(config)["unet"]
    sample = jnp.concatenate([x_t, loc.astype(x_t.dtype)], axis=-1)
    if probe is None:
        return unet.apply({"params": params["unet"]}, sample, t, context, objs, regions=regions)
    return unet.apply(
        {"params": params["unet"]},
        sample,
        t,
        context,
        objs,
        probe,
        regions,
        mutable=["attn_probs"],
    )


def to_latents(config: ModelConfig, params, images, rng=None):
    """Images `[B, R, R, 3]` in [-1, 1] -> the diffusion space (scaled VAE latents or
    the pixels themselves): a posterior draw per image (rng: keys `[B]`) or its mean."""
    if config.vae is None:
        return images
    return modules(config)["vae"].apply(
        {"params": params["vae"]}, images, rng, method=AutoencoderKL.images_to_latents
    )


def to_images(config: ModelConfig, params, latents):
    """The diffusion space -> images `[B, R, R, 3]` in [-1, 1] (clipped)."""
    if config.vae is not None:
        latents = modules(config)["vae"].apply(
            {"params": params["vae"]}, latents, method=AutoencoderKL.latents_to_images
        )
    return jnp.clip(latents, -1.0, 1.0)
