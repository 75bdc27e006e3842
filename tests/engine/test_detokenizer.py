"""Streamed text equals the tokenizer's own decode of the whole, leading spaces included, for the
tokenizer families served: SentencePiece-style (Llama-2, Mistral: Metaspace) and byte-level BPE
(Llama-3, Qwen2, SmolLM2). Tokenizers are trained here, in memory (no hub)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine import SamplingParams
from engine.detokenizer import IncrementalDetokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Voilà: naïve café, 東京の天気 🙂.",
          "Hello world! The capital of France is Paris.", "  spaced   words\tand\nlines  "] * 20
TEXT = "Hello world! The quick brown fox, naïve café 東京 🙂 jumps.\n  Paris"


def _sentencepiece_style() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),  # Llama-2's decoder drops the space it prepended
    ])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", *bytes_]))
    return tokenizer


def _byte_level() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer


@pytest.mark.parametrize("make", [_sentencepiece_style, _byte_level])
def test_streamed_text_is_the_decode_of_the_whole(make):
    """At every split of the text into prompt and generation (that falls between characters)."""
    tokenizer = make()
    ids = tokenizer.encode(TEXT).ids
    whole = tokenizer.decode(ids)
    num_checked = 0
    for num_prompt in range(1, len(ids)):
        prompt, generated = ids[:num_prompt], ids[num_prompt:]
        if not whole.startswith(tokenizer.decode(prompt)):
            continue  # the split falls inside a character
        expected = whole[len(tokenizer.decode(prompt)):]
        detok = IncrementalDetokenizer(tokenizer, SamplingParams(), prompt)
        streamed = ""
        for token_id in generated:
            detok.add_token(token_id)
            streamed += detok.take_delta(is_finished=False)
        streamed += detok.take_delta(is_finished=True)
        assert streamed == expected, num_prompt
        assert "".join(detok.token_texts(0, len(generated))) == expected
        num_checked += 1
    assert num_checked > len(ids) // 2
