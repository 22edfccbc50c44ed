"""Prompts with subject placeholders, tokenised for the fusion text encoder (docs/method.md §3c).

A prompt for N subjects is `"{caption}, the {label_0} is sks, ..., the {label_N-1} is sks"`.
`Tokenizer.prompt` returns fixed-length ids `[L]` plus, per subject slot `[N]`, the
position of its placeholder token (whose embedding the subject's image replaces) and of
its label's last token (two before the placeholder; both get the attention-map loss).
A caption too long for L tokens is shortened; placeholders are never dropped.
`Tokenizer.problems` says so, and names the words a vocabulary subset does not know.

Ids come from CLIP's byte-level BPE (the vocabulary of every Stable Diffusion text
encoder; a copy ships in `sdjax/assets/clip_tokenizer`). A small model may use a
*vocabulary subset*: the CLIP ids it knows, renumbered 0..K-1, with one extra id K for
every other token, so its embedding table has K+1 rows instead of 49,408.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from sdjax.errors import UserError

PLACEHOLDER = "sks"
BUILTIN_VOCAB = os.path.join(os.path.dirname(__file__), "assets", "clip_tokenizer")


# CLIP's word splitter: contractions, letter runs, single digits, punctuation runs
CLIP_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SPECIAL_TOKENS = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "pad": "<|endoftext|>",  # Stable Diffusion 2's tokenizer folder says "!"
}


@dataclass(frozen=True)
class ClipBPE:
    """CLIP's byte-level BPE on the `tokenizers` library (ids equal transformers'
    `CLIPTokenizerFast`, tested; transformers itself is not imported, which would load
    PyTorch where it is installed: 4 s and 270 MB). Text is NFC-normalised, whitespace
    runs become one space, lower-cased, split into words, digits and punctuation, mapped
    to bytes, and each word is BPE-merged with "</w>" marking its end."""

    encoder: Any  # tokenizers.Tokenizer
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def size(self) -> int:
        return self.encoder.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def load(folder: str) -> ClipBPE:
        """From a tokenizer folder: vocab.json and merges.txt, and the special tokens of
        tokenizer_config.json / special_tokens_map.json where present."""
        from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as Encoder
        from tokenizers.models import BPE

        vocab_file, merges_file = (os.path.join(folder, f) for f in ("vocab.json", "merges.txt"))
        for path in (vocab_file, merges_file):
            if not os.path.isfile(path):
                raise UserError(f"tokenizer file missing: {path}")
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#")]
        specials = {**SPECIAL_TOKENS, **_special_tokens(folder)}
        for name, token in specials.items():
            if token not in vocab:
                raise UserError(f"{folder}: the {name} token {token!r} is not in vocab.json")
        encoder = Encoder(
            BPE(
                vocab,
                merges,
                unk_token=SPECIAL_TOKENS["eos"],
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
            )
        )
        encoder.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        encoder.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        encoder.add_special_tokens(
            [AddedToken(specials[k], normalized=True, special=True) for k in ("bos", "eos")]
        )
        return ClipBPE(encoder, *(vocab[specials[k]] for k in ("bos", "eos", "pad")))


def _special_tokens(folder: str) -> dict[str, str]:
    """bos/eos/pad tokens named by a tokenizer folder's JSON files (later files win)."""
    found = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                fields = json.load(f)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {path}: {err}") from None
        for key in SPECIAL_TOKENS:
            token = fields.get(f"{key}_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str):
                found[key] = token
    return found


@dataclass(frozen=True)
class PromptTokens:
    """A tokenised prompt: ids int32 `[L]`; per subject slot `[N]`: placeholder and label
    token positions (int32, 0 in empty slots) and whether the slot holds a subject."""

    ids: np.ndarray
    placeholder_positions: np.ndarray
    label_positions: np.ndarray
    valid: np.ndarray
    truncated: bool


def template(caption: str, labels: Sequence[str]) -> str:
    """The Subject-Diffusion prompt: the caption, then ', the {label} is sks' per subject."""
    return caption + "".join(f", the {label} is {PLACEHOLDER}" for label in labels)


@dataclass(frozen=True)
class Tokenizer:
    """CLIP BPE tokenizer with the placeholder template.

    folder: a tokenizer folder (vocab.json + merges.txt, as in a diffusers pipeline's
    `tokenizer/`), or None for the built-in CLIP vocabulary. vocab_subset: the CLIP ids a
    small model knows (None: all). max_length: the text encoder's token count L.
    """

    folder: str | None = None
    vocab_subset: tuple[int, ...] | None = None
    max_length: int = 77

    @cached_property
    def _bpe(self) -> ClipBPE:
        return ClipBPE.load(self.folder or BUILTIN_VOCAB)

    @cached_property
    def _compact(self) -> dict[int, int] | None:
        if self.vocab_subset is None:
            return None
        return {clip_id: i for i, clip_id in enumerate(self.vocab_subset)}

    @property
    def vocab_size(self) -> int:
        """Rows the text encoder's token embedding needs."""
        if self.vocab_subset is None:
            return self._bpe.size
        return len(self.vocab_subset) + 1  # + the id of every unknown token

    @property
    def unknown_id(self) -> int | None:
        return None if self.vocab_subset is None else len(self.vocab_subset)

    def clip_ids(self, text: str) -> list[int]:
        """CLIP BPE ids of `text`, without begin/end tokens."""
        return self._bpe.encoder.encode(text, add_special_tokens=False).ids

    def _map(self, ids: Sequence[int]) -> list[int]:
        if self._compact is None:
            return list(ids)
        return [self._compact.get(i, self.unknown_id) for i in ids]

    def unknown_words(self, text: str) -> list[str]:
        """Words of `text` this tokenizer's vocabulary subset does not know."""
        if self._compact is None:
            return []
        return [w for w in text.replace(",", " ").split() if self.unknown_id in self.ids(w)]

    def _text(self, clip_ids: Sequence[int]) -> str:
        pieces = (self._bpe.encoder.id_to_token(i) or "" for i in clip_ids)
        return "".join(pieces).replace("</w>", " ").strip()

    def problems(self, caption: str, labels: Sequence[str], known: str = "") -> list[str]:
        """What this model will not read as written, one message each: words it does not
        know (each listed once; `known` may say which it does) and a prompt cut to fit
        `max_length` tokens."""
        found = []
        unknown = list(dict.fromkeys(self.unknown_words(" ".join([caption, *labels]))))
        if unknown:
            found.append(
                f"this model does not know the word{'s' * (len(unknown) > 1)} "
                f"{', '.join(unknown)} (each is read as one unknown token){known}"
            )
        suffix = sum(len(self.ids(template("", [label]))) for label in labels)
        budget = self.max_length - 2 - suffix
        caption_ids = self.clip_ids(caption)
        if budget >= 0 and len(caption_ids) > budget:
            dropped = self._text(caption_ids[budget:])
            found.append(
                f"the prompt is {len(caption_ids)} tokens but this model reads "
                f"{max(budget, 0)} (of {self.max_length}, with the subjects' part): "
                f"{dropped!r} at its end is dropped"
            )
        return found

    def ids(self, text: str) -> list[int]:
        """Model ids of `text`, without begin/end tokens."""
        return self._map(self.clip_ids(text))

    def _frame(self, body: list[int]) -> np.ndarray:
        """[BOS] body [EOS] [PAD]... as int32 `[max_length]`."""
        bpe = self._bpe
        bos, eos, pad = self._map([bpe.bos_id, bpe.eos_id, bpe.pad_id])
        ids = [bos, *body, eos]
        return np.asarray(ids + [pad] * (self.max_length - len(ids)), np.int32)

    def plain(self, text: str) -> np.ndarray:
        """A prompt with no subjects (truncated to fit): int32 `[max_length]`."""
        return self._frame(self.ids(text)[: self.max_length - 2])

    def prompt(self, caption: str, labels: Sequence[str], slots: int) -> PromptTokens:
        """The placeholder prompt for `labels` (at most `slots` of them), shortened to fit."""
        if len(labels) > slots:
            raise UserError(f"{len(labels)} subjects but the model has {slots} subject slots")
        # CLIP's BPE splits at spaces and punctuation first, so the caption and each
        # subject's suffix tokenise independently and can be cut between them.
        suffixes = [self.ids(template("", [label])) for label in labels]
        budget = self.max_length - 2 - sum(len(s) for s in suffixes)
        if budget < 0:
            raise UserError(f"subject labels {list(labels)} do not fit in {self.max_length} tokens")
        caption_ids = self.ids(caption)
        body = caption_ids[:budget]
        placeholders, label_positions = np.zeros(slots, np.int32), np.zeros(slots, np.int32)
        for i, suffix in enumerate(suffixes):
            body = body + suffix
            placeholders[i] = len(body)  # 1 (BOS) + index of the last token = len(body)
            label_positions[i] = len(body) - 2
        return PromptTokens(
            ids=self._frame(body),
            placeholder_positions=placeholders,
            label_positions=label_positions,
            valid=np.arange(slots) < len(labels),
            truncated=len(caption_ids) > budget,
        )

    @staticmethod
    def for_vocabulary(words: Sequence[str], max_length: int) -> Tokenizer:
        """A built-in-vocabulary tokenizer restricted to the ids needed by `words` (plus the
        template's words, the placeholder and the special tokens)."""
        full = Tokenizer(max_length=max_length)
        bpe = full._bpe
        needed = {bpe.bos_id, bpe.eos_id, bpe.pad_id}
        for word in [*words, *template("", ["x"]).replace(",", " , ").split()]:
            needed.update(full.clip_ids(word))
        return Tokenizer(vocab_subset=tuple(sorted(needed)), max_length=max_length)
