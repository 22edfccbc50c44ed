"""Text vocabularies of models trained from scratch: CLIP's, or only the toy world's words."""

from __future__ import annotations

from sdjax.errors import UserError
from sdjax.models.clip import CLIPTextConfig
from sdjax.tokenizer import Tokenizer


def text_with_vocabulary(text: dict, vocab: str | None) -> tuple[dict, Tokenizer]:
    """A text-tower config dict and its tokenizer; vocab "toy" restricts the vocabulary to
    the toy world's words (a small embedding table), None keeps CLIP's."""
    length = text.get("max_position_embeddings", CLIPTextConfig.max_position_embeddings)
    if vocab is None:
        return text, Tokenizer(max_length=length)
    if vocab != "toy":
        raise UserError(f"model.vocab must be 'toy' or unset, got {vocab!r}")
    from sdjax.data.toy import vocabulary

    tokenizer = Tokenizer.for_vocabulary(vocabulary(), length)
    subset = tokenizer.vocab_subset
    text = {
        **text,
        "vocab_size": tokenizer.vocab_size,
        "bos_token_id": subset.index(49406),
        "eos_token_id": subset.index(49407),
        "pad_token_id": subset.index(49407),
    }
    return text, tokenizer
