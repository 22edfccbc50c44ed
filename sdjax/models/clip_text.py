"""The fusion text encoder: CLIP's text tower that can take subject embeddings in place of
placeholder tokens (Subject-Diffusion, docs/method.md §3c).

Laid out as transformers' `CLIPTextModel` (`text_model.embeddings.token_embedding`, ...,
`text_model.final_layer_norm`); SD 1.x's CLIP ViT-L/14 and SD 2.x's OpenCLIP ViT-H text
towers (HF format) differ only by config. Shapes: token ids `[B, L]` (L <= the config's
`max_position_embeddings`), subject embeddings `[B, S, D]` at token positions `[B, S]`
-> hidden states `[B, L, D]` and the pooled EOS feature `[B, D]`. All shapes are fixed,
so one jit serves every prompt and every number of subjects up to S.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sdjax.models.clip import CLIPTextConfig, Encoder
from sdjax.models.layers import constrain, embedding, layer_norm

# transformers' configs from before its PR #24773 carry eos_token_id 2; for them it pools
# at the largest token id, which is EOS in CLIP's vocabulary. Newer configs give the real id.
LEGACY_EOS_TOKEN_ID = 2


def inject_subjects(tokens, subject_embeds, subject_positions, subject_valid):
    """Replace token embeddings by subject embeddings where a subject slot is valid.

    tokens `[B, L, D]`, subject_embeds `[B, S, D]`, subject_positions int `[B, S]`,
    subject_valid bool `[B, S]` -> `[B, L, D]`. Invalid slots change nothing; if two valid
    slots name one position, which of them wins is unspecified.
    """
    batch, length, _ = tokens.shape
    # Invalid slots point past the end, where mode="drop" discards the write.
    where = jnp.where(subject_valid, subject_positions, length)
    rows = jnp.arange(batch)[:, None]
    return tokens.at[rows, where].set(subject_embeds.astype(tokens.dtype), mode="drop")


def eos_positions(input_ids, eos_token_id: int):
    """Where transformers' `CLIPTextModel` pools: `[B, L]` ids -> `[B]` positions.

    The first EOS token; for legacy configs (see `LEGACY_EOS_TOKEN_ID`) the first largest id.
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class TextEmbeddings(nn.Module):
    """transformers `CLIPTextEmbeddings`, with subject embeddings injected before positions."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, subjects=None):
        cfg = self.config
        width = cfg.hidden_size
        tokens = embedding(cfg.vocab_size, width, ("vocab", "embed"), name="token_embedding")(
            input_ids
        )
        if subjects is not None:
            tokens = inject_subjects(tokens, *subjects)
        positions = embedding(
            cfg.max_position_embeddings, width, (None, "embed"), name="position_embedding"
        )(jnp.arange(input_ids.shape[1]))
        return tokens + positions[None]


class TextEncoder(nn.Module):
    """`(input_ids, subject_embeds, subject_positions, subject_valid) -> (hidden, pooled)`.

    input_ids int32 `[B, L]`; subject_embeds `[B, S, D]` (or None: a plain CLIP text
    encoder), subject_positions int32 `[B, S]`, subject_valid bool `[B, S]` (None: all
    valid). Returns the final-layer-normed hidden states `[B, L, D]` and the pooled
    feature `[B, D]` at the EOS token, as transformers computes them.
    """

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, subject_embeds=None, subject_positions=None, subject_valid=None):
        cfg = self.config
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"{input_ids.shape[1]} tokens exceed max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        subjects = None
        if subject_embeds is not None:
            if subject_positions is None:
                raise ValueError("subject_embeds need subject_positions")
            if subject_valid is None:
                subject_valid = jnp.ones(subject_positions.shape, bool)
            subjects = (subject_embeds, subject_positions, subject_valid)
        x = TextEmbeddings(cfg, name="embeddings")(input_ids, subjects)
        x = constrain(x, ("batch", "length", "embed"))
        x = Encoder(cfg, causal=True, name="encoder")(x)
        x = layer_norm(cfg.layer_norm_eps, name="final_layer_norm")(x)
        pooled = x[jnp.arange(x.shape[0]), eos_positions(input_ids, cfg.eos_token_id)]
        return x, pooled
