"""CLIP's BPE on the `tokenizers` library gives transformers' `CLIPTokenizerFast` ids."""

import json
import shutil
import subprocess
import sys

import pytest

from sdjax.errors import UserError
from sdjax.tokenizer import BUILTIN_VOCAB, Tokenizer

TEXTS = [
    "a photo of a dog",
    "A  PHOTO\tof a Dog's toy, on the beach!!",
    "the red_cartoon   backpack (sks) -- 3D render 1234",
    "café naïve façade; Ünïcödé — “quotes” … ",
    "don't can't we'll they've I'm he'd",
    "emoji 🐶🎒 and ＦＵＬＬ width",
    "",
    "   ",
    "<|endoftext|> inside <|startoftext|> text",
    "a" * 300,
]


@pytest.fixture(scope="module")
def reference():
    from transformers import CLIPTokenizerFast

    return CLIPTokenizerFast(
        vocab_file=f"{BUILTIN_VOCAB}/vocab.json", merges_file=f"{BUILTIN_VOCAB}/merges.txt"
    )


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers(reference, text):
    ours = Tokenizer(max_length=77)
    assert ours.clip_ids(text) == reference(text, add_special_tokens=False).input_ids


def test_special_tokens_and_size_equal_transformers(reference):
    ours = Tokenizer(max_length=77)
    assert ours.vocab_size == len(reference)
    frame = ours.plain("a dog")
    assert frame[0] == reference.bos_token_id
    assert frame[3] == reference.eos_token_id and frame[-1] == reference.pad_token_id


def test_a_folders_special_tokens_are_read(reference, tmp_path):
    """Stable Diffusion 2's tokenizer folder pads with "!" (id 0), not with <|endoftext|>."""
    from transformers import CLIPTokenizerFast

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(f"{BUILTIN_VOCAB}/{name}", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!"}))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": {"content": "!", "lstrip": False}})
    )
    theirs = CLIPTokenizerFast.from_pretrained(str(tmp_path))
    ours = Tokenizer(folder=str(tmp_path), max_length=16).plain("a dog")
    assert ours.tolist() == theirs("a dog", padding="max_length", max_length=16).input_ids
    assert ours[-1] == 0


def test_bad_folders(tmp_path):
    with pytest.raises(UserError, match="tokenizer file missing"):
        Tokenizer(folder=str(tmp_path)).plain("x")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(f"{BUILTIN_VOCAB}/{name}", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(UserError, match="pad token '<pad>' is not in vocab.json"):
        Tokenizer(folder=str(tmp_path)).plain("x")


def test_tokenizing_does_not_import_transformers_or_torch():
    code = (
        "import sys; from sdjax.tokenizer import Tokenizer; Tokenizer().plain('a dog');"
        "print(sorted({'transformers', 'torch'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
