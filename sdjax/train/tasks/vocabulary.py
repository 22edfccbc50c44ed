"""Text vocabularies of models trained from scratch: CLIP's, or only the toy world's words."""

from __future__ import annotations

from sdjax.errors import UserError
from sdjax.models.clip import CLIPTextConfig
from sdjax.tokenizer import Tokenizer


def toy_vocabulary() -> list[str]:
    """Every word of the toy world's captions and labels."""
    from sdjax.data.toy import BACKGROUNDS, ToyWorld

    world = ToyWorld()
    words = {"a", "an", "and", "on", "background", *BACKGROUNDS}
    for vocab in (world.shapes, world.colours, world.patterns):
        words.update(w for item in vocab for w in item.split())
    return sorted(words)


def text_with_vocabulary(text: dict, vocab: str | None) -> tuple[dict, Tokenizer]:
    """A text-tower config dict and its tokenizer; vocab "toy" restricts the vocabulary to
    the toy world's words (a small embedding table), None keeps CLIP's."""
    length = text.get("max_position_embeddings", CLIPTextConfig.max_position_embeddings)
    if vocab is None:
        return text, Tokenizer(max_length=length)
    if vocab != "toy":
        raise UserError(f"model.vocab must be 'toy' or unset, got {vocab!r}")
    tokenizer = Tokenizer.for_vocabulary(toy_vocabulary(), length)
    subset = tokenizer.vocab_subset
    text = {
        **text,
        "vocab_size": tokenizer.vocab_size,
        "bos_token_id": subset.index(49406),
        "eos_token_id": subset.index(49407),
        "pad_token_id": subset.index(49407),
    }
    return text, tokenizer
