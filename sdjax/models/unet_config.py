"""`UNetConfig`: the UNet's shape, read from and written to diffusers' config.json.

Covers the Stable Diffusion 1.x / 2.x family of `UNet2DConditionModel` (cross-attention
down/up blocks, one mid block, positional time embedding), plus Subject-Diffusion's
additions: extra input channels (location control) and the gated adapter
(`attention_type="gated"` in diffusers). Any other diffusers option is rejected by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sdjax.errors import UserError

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers options we implement only at these values (the SD 1.x / 2.x settings).
_FIXED = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
# Accepted and without effect on the math in float32.
_IGNORED = {"upcast_attention", "addition_embed_type_num_heads"}


@dataclass(frozen=True)
class UNetConfig:
    """The UNet's shape. `heads` is the number of attention heads per resolution level."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = DOWN_BLOCKS[:1] * 3 + DOWN_BLOCKS[1:]
    up_block_types: tuple[str, ...] = UP_BLOCKS[1:] + UP_BLOCKS[:1] * 3
    layers_per_block: int = 2
    heads: tuple[int, ...] = (5, 10, 20, 20)
    cross_attention_dim: int = 1024
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    use_linear_projection: bool = True
    transformer_layers_per_block: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # Subject-Diffusion and sdjax settings (not in diffusers' math):
    adapter: bool = False  # GLIGEN gated self-attention in every transformer block
    probe_layers: tuple[str, ...] = ()  # blocks whose cross-attention maps can be probed
    remat: bool = False  # gradient checkpointing of resnets and transformer blocks
    dtype: str = "float32"  # compute dtype of matmuls/convolutions
    attention_implementation: str | None = None  # None (XLA) or a `kernels` name

    def __post_init__(self):
        levels = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "heads"):
            if len(getattr(self, name)) != levels:
                raise UserError(f"UNet config: {name} needs {levels} entries")
        for kind, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            for block in getattr(self, kind):
                if block not in allowed:
                    raise UserError(f"UNet config: unsupported {kind} entry {block!r}")
        for channels, heads in zip(self.block_out_channels, self.heads):
            if channels % heads:
                raise UserError(f"UNet config: {channels} channels do not split into {heads} heads")

    @property
    def objs_dim(self) -> int:
        """Width of the grounding tokens the adapter reads (diffusers: cross_attention_dim)."""
        return self.cross_attention_dim

    @classmethod
    def from_diffusers(cls, d: dict, **overrides) -> UNetConfig:
        """A diffusers `UNet2DConditionModel` config.json dict (+ sdjax-only overrides)."""
        known = {f.name for f in dataclasses.fields(cls)} | set(_FIXED) | _IGNORED
        known |= {"attention_head_dim", "num_attention_heads", "attention_type"}
        for key, value in d.items():
            if key.startswith("_"):
                continue
            if key not in known:
                raise UserError(f"UNet config: unknown diffusers option {key!r}")
            if key in _FIXED and _normalise(value) != _FIXED[key]:
                raise UserError(f"UNet config: unsupported {key}={value!r}")
        if d.get("attention_type", "default") not in ("default", "gated"):
            raise UserError(f"UNet config: unsupported attention_type={d['attention_type']!r}")
        levels = len(d.get("block_out_channels", cls.block_out_channels))
        # diffusers' legacy naming: attention_head_dim holds the number of heads.
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        fields = {
            "heads": _per_level(heads, levels, "num_attention_heads"),
            "adapter": d.get("attention_type", "default") == "gated",
            "layers_per_block": _uniform(d.get("layers_per_block", 2), "layers_per_block"),
            "transformer_layers_per_block": _uniform(
                d.get("transformer_layers_per_block", 1), "transformer_layers_per_block"
            ),
        }
        for f in dataclasses.fields(cls):
            if f.name in d and f.name not in fields:
                fields[f.name] = _normalise(d[f.name])
        if isinstance(fields.get("cross_attention_dim"), tuple):
            fields["cross_attention_dim"] = _uniform(
                fields["cross_attention_dim"], "cross_attention_dim"
            )
        return cls(**{**fields, **overrides})

    def to_diffusers(self) -> dict:
        """The diffusers config.json dict of this UNet (adapter -> attention_type 'gated')."""
        d = {
            "_class_name": "UNet2DConditionModel",
            **_FIXED,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": list(self.down_block_types),
            "up_block_types": list(self.up_block_types),
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": list(self.heads),
            "num_attention_heads": None,
            "cross_attention_dim": self.cross_attention_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "sample_size": self.sample_size,
            "use_linear_projection": self.use_linear_projection,
            "transformer_layers_per_block": self.transformer_layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "upcast_attention": False,
            "attention_type": "gated" if self.adapter else "default",
        }
        return d


def _normalise(value):
    return tuple(value) if isinstance(value, list) else value


def _per_level(value, levels: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * levels
    if len(value) != levels:
        raise UserError(f"UNet config: {name} needs {levels} entries, got {len(value)}")
    return tuple(value)


def _uniform(value, name: str) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise UserError(f"UNet config: per-level {name}={list(value)} is not supported")
    return value[0]
