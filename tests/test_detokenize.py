"""Streamed detokenization: the deltas add up to the full decode and never hold a broken character."""

from __future__ import annotations

from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from shared.detokenize import IncrementalDetokenizer

TEXTS = [
    "Hello, world! This is a plain sentence.",
    "  leading spaces, trailing spaces  ",
    "line one\nline two\n\n\tindented\r\nwindows",
    "Emoji: 😀 👍🏽 👨‍👩‍👧 🇫🇷 and text after",
    "CJK: 東京タワーは高い。北京欢迎你。한국어 문장",
    "Combining marks: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Z\u0351\u0352\u0353",
    "Arabic and Hebrew: مرحبا بالعالم שלום עולם",
    "def f(x):\n    return {'a': [x, x ** 2]}  # code",
    "mixed🙂中文e\u0301😀end",
    "🙂🙂🙂",
]
PROMPTS = ["", "Question:", "The answer is", "日本語の"]


def _train(pre_tokenizer, decoder, alphabet) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<eos>"], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(TEXTS * 3 + PROMPTS, trainer)
    return tok


def _byte_level_bpe() -> tokenizers.Tokenizer:
    """GPT-2 style: characters may split across tokens, spaces are ordinary bytes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    return _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), alphabet)


def _metaspace_bpe() -> tokenizers.Tokenizer:
    """SentencePiece style: a word's space is the token's leading '▁', dropped at the very start of a decode."""
    return _train(pre_tokenizers.Metaspace(), decoders.Metaspace(), [])


@pytest.fixture(scope="module", params=["byte_level", "metaspace", "default_model"])
def tokenizer(request: pytest.FixtureRequest) -> tokenizers.Tokenizer:
    if request.param == "byte_level":
        return _byte_level_bpe()
    if request.param == "metaspace":
        return _metaspace_bpe()
    model_dir: Path = request.getfixturevalue("default_model_dir")
    return tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def _stream(tok: tokenizers.Tokenizer, prompt_ids: list[int], ids: list[int], skip_special: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special)
    return [detok.push(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_full_decode(tokenizer: tokenizers.Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    deltas = _stream(tokenizer, [], ids)
    assert "".join(deltas) == tokenizer.decode(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_no_delta_holds_a_replacement_character(tokenizer: tokenizers.Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert "\ufffd" not in tokenizer.decode(ids)
    for delta in _stream(tokenizer, [], ids):
        assert "\ufffd" not in delta


def test_multibyte_characters_really_are_split_across_tokens(tokenizer: tokenizers.Tokenizer) -> None:
    """The case the detokenizer exists for must occur, else the tests above prove little."""
    ids = tokenizer.encode("🙂🙂🙂 👨‍👩‍👧", add_special_tokens=False).ids
    single = [tokenizer.decode([i]) for i in ids]
    if not any("\ufffd" in s for s in single):
        pytest.skip("this tokenizer keeps these characters whole")
    assert "\ufffd" not in "".join(_stream(tokenizer, [], ids))


@pytest.mark.parametrize("prompt", PROMPTS[1:])
@pytest.mark.parametrize("text", [" and then some more words.", " 😀 smile", "はい、そうです。"])
def test_continuation_of_a_prompt_keeps_its_leading_space(
    tokenizer: tokenizers.Tokenizer, prompt: str, text: str
) -> None:
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    ids = tokenizer.encode(prompt + text, add_special_tokens=False).ids
    assert ids[: len(prompt_ids)] == prompt_ids, "the prompt must tokenize as a prefix for this comparison"
    out_ids = ids[len(prompt_ids) :]
    expected = tokenizer.decode(ids)[len(tokenizer.decode(prompt_ids)) :]
    assert "".join(_stream(tokenizer, prompt_ids, out_ids)) == expected


def test_special_tokens_are_skipped_or_kept_on_request(tokenizer: tokenizers.Tokenizer) -> None:
    special = next(t for t in tokenizer.get_added_tokens_decoder().values() if t.special).content
    special_id = tokenizer.token_to_id(special)
    ids = tokenizer.encode("Hi there", add_special_tokens=False).ids + [special_id]
    assert "".join(_stream(tokenizer, [], ids)) == tokenizer.decode(ids)
    kept = "".join(_stream(tokenizer, [], ids, skip_special=False))
    assert kept == tokenizer.decode(ids, skip_special_tokens=False) and kept.endswith(special)


def test_flush_releases_an_unfinished_character_as_a_full_decode_would(tokenizer: tokenizers.Tokenizer) -> None:
    ids = tokenizer.encode("ok 😀", add_special_tokens=False).ids
    cut = ids[:-1]  # the emoji's last byte token is missing (or, if it is one token, the emoji)
    deltas = _stream(tokenizer, [], cut)
    assert "".join(deltas) == tokenizer.decode(cut)
    assert all("\ufffd" not in d for d in deltas[:-1])
