"""One tokenizer pass per text: the ids equal the reference library's own call exactly, and a
text is flagged as truncated exactly when it needs more tokens than the model takes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

FAMILIES = ["align", "openclip", "altclip"]
SHORT = ["a cat", "This is a photo of a red square.", "一张猫的照片"]
LONG = "a photo of a red cat sitting on a green chair " * 20


def _reference(family: str, spec: str) -> tuple[Callable[[list[str]], dict[str, torch.Tensor]],
                                                  Callable[[str], int]]:
    """The library's call for a batch, and a text's token count before truncation."""
    if family == "openclip":
        import open_clip

        tokenizer = open_clip.get_tokenizer(spec)
        return (lambda texts: {"input_ids": tokenizer(texts)},
                lambda text: len(tokenizer.encode(text)) + 2)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(spec)
    padding = {"align": "max_length", "altclip": True}[family]
    limit = {"align": 64, "altclip": 77}[family]
    return (lambda texts: dict(processor(text=texts, return_tensors="pt", padding=padding,
                                         max_length=limit, truncation=True)),
            lambda text: len(processor.tokenizer(text)["input_ids"]))


def _at_the_limit(count: Callable[[str], int], limit: int) -> str:
    """The longest run of "cat" that still fits."""
    return next(" ".join(["cat"] * n) for n in range(200, 0, -1)
                if count(" ".join(["cat"] * n)) <= limit)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_pass_gives_the_library_ids_and_flags_only_long_texts(
        family: str, tiny_encoders, tiny_model_dirs) -> None:
    encoder = tiny_encoders[family]
    call, count = _reference(family, tiny_model_dirs[family])
    limit = encoder.max_text_tokens
    fitting = _at_the_limit(count, limit)
    texts = [*SHORT, fitting, fitting + " cat", LONG]
    ours = encoder.tokenize(texts)
    assert ours.truncated == [False, False, False, False, True, True]
    assert ours.truncated == [count(text) > limit for text in texts]
    expected = call(texts)
    assert set(ours.tensors) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(ours.tensors[name], tensor), name
        assert ours.tensors[name].dtype == tensor.dtype


@pytest.mark.parametrize("family", FAMILIES)
def test_short_texts_alone_are_not_flagged(family: str, tiny_encoders) -> None:
    assert tiny_encoders[family].tokenize(SHORT).truncated == [False] * len(SHORT)
    assert tiny_encoders[family].tokenize([LONG]).truncated == [True]


@pytest.mark.parametrize("strip_sep_token", [False, True])
def test_open_clip_hf_tokenizer_in_one_pass_equals_its_call(
        strip_sep_token: bool, tiny_model_dirs) -> None:
    """open_clip's HFTokenizer (the text side of checkpoints with an HF text tower)."""
    from open_clip.tokenizer import HFTokenizer

    from worker.models.tokens import open_clip_hf_tokens

    tokenizer = HFTokenizer(tiny_model_dirs["align"], context_length=16,
                            strip_sep_token=strip_sep_token)
    texts = ["a cat", "a  red\tcat ", LONG]
    ids, truncated = open_clip_hf_tokens(tokenizer, texts, 16)
    assert torch.equal(ids, tokenizer(texts))
    assert truncated == [False, False, True]
