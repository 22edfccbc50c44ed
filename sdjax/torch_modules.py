"""PyTorch side of an exported model (`sdjax export`): needs the `torch` extra.

- `GroundingNet`, `ClsMLP`: the two modules diffusers/transformers have no class for,
  loaded from `OUT_DIR/grounding/` and `OUT_DIR/cls_mlp/`.
- `attach_grounding(unet)`: diffusers' gated UNet runs its `position_net` on
  `cross_attention_kwargs["gligen"]`; this replaces it so `{"gligen": {"objs": objs}}`
  passes GroundingNet's tokens straight to the adapters.
- `location_mask`: `sdjax.conditioning.location_mask` in PyTorch, so sampling an export
  needs no JAX.
- `RegionBinding`: region-bound attention (`sdjax.models.regions`) as diffusers attention
  processors on the adapters' and the cross-attention layers, for models exported with
  `region_attention` (`sdjax.json` says so).
- `TorchSubjectDiffusion`: the whole sampler (subjects -> CLS/patches, fusion text
  encoder, GroundingNet, DDIM with three-branch guidance, decode) in PyTorch, for
  inputs prepared by `sdjax.sampling.prepare_inputs`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

NUM_FREQS = 8
BOX_DIM = NUM_FREQS * 2 * 4


def fourier_box_embedding(boxes: torch.Tensor) -> torch.Tensor:
    """boxes `[..., 4]` -> `[..., 64]`: [sin(f0 xyxy), cos(f0 xyxy), sin(f1 xyxy), ...]."""
    freqs = 100.0 ** (torch.arange(NUM_FREQS, dtype=torch.float32) / NUM_FREQS)
    args = freqs[:, None] * boxes[..., None, :].float()
    return torch.stack([args.sin(), args.cos()], dim=-2).flatten(-3)


class ProjectionMLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, out)

    def forward(self, x):
        return self.linear_2(nn.functional.gelu(self.linear_1(self.norm(x))))


class GroundingNet(nn.Module):
    """patches `[B,N,P,D]`, boxes `[B,N,4]`, valid/use_box `[B,N]` -> objs `[B,N*P,out]`."""

    def __init__(self, patch_dim: int, num_patches: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.mlp = ProjectionMLP(patch_dim + BOX_DIM, hidden_dim, out_dim)
        self.null_patch_feature = nn.Parameter(torch.zeros(num_patches, patch_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(num_patches, BOX_DIM))

    def forward(self, patches, boxes, valid, use_box=None):
        b, n, p, _ = patches.shape
        use_box = valid if use_box is None else valid & use_box
        patches = torch.where(valid[..., None, None], patches, self.null_patch_feature)
        position = fourier_box_embedding(boxes)[:, :, None].expand(b, n, p, BOX_DIM)
        position = torch.where(use_box[..., None, None], position, self.null_position_feature)
        return self.mlp(torch.cat([patches, position], dim=-1)).reshape(b, n * p, -1)


class ClsMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = ProjectionMLP(in_dim, out_dim, out_dim)

    def forward(self, cls):
        return self.mlp(cls)


def _load(cls, folder: str):
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json")) as f:
        module = cls(**json.load(f))
    module.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=True)
    return module.eval()


def load_grounding(folder: str) -> GroundingNet:
    return _load(GroundingNet, folder)


def load_cls_mlp(folder: str) -> ClsMLP:
    return _load(ClsMLP, folder)


class _PassObjs(nn.Module):
    def forward(self, objs):
        return objs


def attach_grounding(unet) -> None:
    """Let `cross_attention_kwargs={"gligen": {"objs": objs}}` reach the adapters as is."""
    unet.position_net = _PassObjs()


def location_mask(boxes: torch.Tensor, valid: torch.Tensor, size: int) -> torch.Tensor:
    """1 outside every valid box, 0 inside any: boxes `[B, N, 4]`, valid `[B, N]` ->
    float32 `[B, 1, size, size]` (NCHW). A pixel is inside when its centre is."""
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    x1, y1, x2, y2 = (boxes[..., k, None, None] for k in range(4))  # [B, N, 1, 1]
    inside_x = (centres[None, None, None, :] >= x1) & (centres[None, None, None, :] < x2)
    inside_y = (centres[None, None, :, None] >= y1) & (centres[None, None, :, None] < y2)
    inside = inside_x & inside_y & valid[..., None, None]  # [B, N, size, size]
    return torch.prod(1.0 - inside.float(), dim=1)[:, None]


def token_subjects(placeholders, labels, valid, length: int) -> torch.Tensor:
    """int64 `[B, L]`: subject k at its placeholder and label positions (`[B, N]` each) where
    valid, -1 elsewhere (`sdjax.models.regions.token_subjects`)."""
    positions = torch.cat([placeholders, labels], dim=1).long()  # [B, 2N]
    n = placeholders.shape[1]
    owner = torch.cat([torch.arange(n), torch.arange(n)])
    hit = (torch.arange(length)[None, None, :] == positions[:, :, None]) & torch.cat(
        [valid, valid], dim=1
    )[:, :, None]
    return torch.where(hit, owner[None, :, None], -1).amax(dim=1)


def region_cells(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """bool `[B, N, height*width]` from regions `[B, N, m, m]` (`regions.region_cells`)."""
    b, n, mh, mw = masks.shape
    blocks = masks.reshape(b, n, height, mh // height, width, mw // width)
    return (blocks.amax(dim=(3, 5)) >= 0.5).reshape(b, n, height * width)


def _grid(tokens: int) -> tuple[int, int]:
    side = int(round(tokens**0.5))
    return side, side


class RegionBinding:
    """The subjects' regions of the current UNet call, read by `RegionProcessor`s.

    `regions` is (masks float `[B, N, m, m]`, objs bool `[B, N]`, tokens int `[B, L]`), as
    `sdjax.models.regions.Regions`, or None (every token seen everywhere)."""

    def __init__(self, num_objs: int):
        self.num_objs = num_objs  # grounding tokens per image (N * P)
        self.regions = None

    def adapter_mask(self, length: int) -> torch.Tensor:
        """bool `[B, T+O, T+O]` (`regions.adapter_mask`) for T+O = `length` tokens."""
        masks, objs, _ = self.regions
        o = self.num_objs
        t = length - o
        cells = region_cells(masks, *_grid(t))
        b, n = objs.shape
        seen = (cells | ~objs[:, :, None]).transpose(1, 2).repeat_interleave(o // n, dim=2)
        visual = torch.cat([torch.ones(b, t, t, dtype=torch.bool), seen], dim=2)
        return torch.cat([visual, torch.ones(b, o, t + o, dtype=torch.bool)], dim=1)

    def cross_mask(self, length: int) -> torch.Tensor:
        """bool `[B, T, L]` (`regions.cross_mask`) for T = `length` visual positions."""
        masks, _, owner = self.regions
        cells = region_cells(masks, *_grid(length)).transpose(1, 2)  # [B, T, N]
        index = owner.clamp(min=0)[:, None, :].expand(-1, length, -1)
        return torch.gather(cells, 2, index) | (owner < 0)[:, None, :]

    def attach(self, unet) -> None:
        """Install `RegionProcessor`s on every adapter (fuser) and cross-attention."""
        for name, module in unet.named_modules():
            if name.endswith(".fuser"):
                module.attn.set_processor(RegionProcessor(self, "adapter"))
            elif name.endswith(".attn2"):
                module.set_processor(RegionProcessor(self, "cross"))


class RegionProcessor:
    """diffusers' scaled-dot-product processor with the region mask as an additive bias."""

    def __init__(self, binding: RegionBinding, kind: str):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.base, self.binding, self.kind = AttnProcessor2_0(), binding, kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        if self.binding.regions is not None:
            length = hidden_states.shape[1]
            mask = (
                self.binding.adapter_mask(length)
                if self.kind == "adapter"
                else self.binding.cross_mask(length)
            )
            attention_mask = torch.zeros(mask.shape, dtype=hidden_states.dtype).masked_fill(
                ~mask, torch.finfo(hidden_states.dtype).min
            )
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)


class TorchSubjectDiffusion:
    """An exported model folder, sampled in PyTorch (float32)."""

    def __init__(self, folder: str):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPVisionModelWithProjection

        def sub(name):
            return os.path.join(folder, name)

        self.unet = UNet2DConditionModel.from_pretrained(sub("unet")).eval()
        attach_grounding(self.unet)
        self.text_encoder = CLIPTextModel.from_pretrained(sub("text_encoder")).eval()
        self.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            sub("image_encoder")
        ).eval()
        self.vae = (
            AutoencoderKL.from_pretrained(sub("vae")).eval() if os.path.isdir(sub("vae")) else None
        )
        self.grounding = load_grounding(sub("grounding"))
        self.cls_mlp = load_cls_mlp(sub("cls_mlp"))
        self.scheduler = DDIMScheduler.from_pretrained(sub("scheduler"))
        with open(sub("sdjax.json")) as f:
            self.config = json.load(f)["model"]
        self.binding = None
        if self.config.get("region_attention"):
            image = self.config["image"]
            patches = (image["image_size"] // image["patch_size"]) ** 2
            self.binding = RegionBinding(self.config["max_subjects"] * patches)
            self.binding.attach(self.unet)

    def encode_prompt(self, ids, embeds=None, positions=None, valid=None):
        """Fusion text encoder: placeholder token embeddings replaced by `embeds`."""
        hook = None
        if embeds is not None:

            def replace(module, args, out):
                out = out.clone()
                rows, slots = torch.nonzero(valid, as_tuple=True)
                out[rows, positions[rows, slots]] = embeds[rows, slots]
                return out

            hook = self.text_encoder.text_model.embeddings.token_embedding.register_forward_hook(
                replace
            )
        try:
            return self.text_encoder(ids).last_hidden_state
        finally:
            if hook is not None:
                hook.remove()

    def _regions(self, t: dict, on: torch.Tensor, none: torch.Tensor):
        """The three guidance branches' regions (as `sdjax.sampling`): [text + subjects |
        empty text + subjects | unconditional]."""
        length = t["ids"].shape[1]

        def tokens(valid):
            return token_subjects(t["placeholders"], t["label_positions"], valid, length)

        masks = t["regions"].float()
        return (
            torch.cat([masks, masks, masks]),
            torch.cat([on, on, none]),
            torch.cat([tokens(on), tokens(none), tokens(none)]),
        )

    @torch.no_grad()
    def __call__(
        self,
        inputs: dict,
        x_T: np.ndarray,
        num_steps: int,
        text_scale: float,
        image_scale: float,
        subject_steps: int | None = None,
    ) -> np.ndarray:
        """inputs: numpy dict of `sdjax.sampling.prepare_inputs` batched `[B, ...]`; x_T
        NHWC noise. Returns uint8 images `[B, R, R, 3]`."""
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
        b, n = t["valid"].shape
        refs = t["refs"].flatten(0, 1).permute(0, 3, 1, 2)
        vision = self.image_encoder(refs, output_hidden_states=True)
        patches = vision.last_hidden_state[:, 1:].reshape(
            b, n, -1, vision.last_hidden_state.shape[-1]
        )
        cls = vision.image_embeds.reshape(b, n, -1)
        ctx_subject = self.encode_prompt(t["ids"], self.cls_mlp(cls), t["placeholders"], t["valid"])
        ctx_plain = self.encode_prompt(t["plain_ids"])
        ctx_empty = self.encode_prompt(t["empty_ids"])
        objs = self.grounding(patches, t["boxes"], t["valid"], t["use_box"])
        none = torch.zeros_like(t["valid"])
        null_objs = self.grounding(patches, t["boxes"], none, none)
        loc = location_mask(t["boxes"], t["valid"], x_T.shape[1])
        x = torch.from_numpy(np.ascontiguousarray(x_T)).permute(0, 3, 1, 2)
        subject_steps = num_steps if subject_steps is None else subject_steps
        self.scheduler.set_timesteps(num_steps)
        for i, step in enumerate(self.scheduler.timesteps):
            on = i < subject_steps
            ctx, o, lm = (ctx_subject, objs, loc) if on else (ctx_plain, null_objs, 0 * loc)
            if self.binding is not None:
                self.binding.regions = self._regions(t, t["valid"] & on, none)
            sample = torch.cat(
                [torch.cat([x, lm], 1), torch.cat([x, lm], 1), torch.cat([x, 0 * loc], 1)]
            )
            out = self.unet(
                sample,
                step,
                torch.cat([ctx, ctx_empty, ctx_empty]),
                cross_attention_kwargs={"gligen": {"objs": torch.cat([o, o, null_objs])}},
            ).sample
            e_t, e_i, e_u = out.chunk(3)
            eps = e_u + text_scale * (e_t - e_i) + image_scale * (e_i - e_u)
            x = self.scheduler.step(eps, step, x).prev_sample
        if self.binding is not None:
            self.binding.regions = None
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).numpy()
