"""What the engine tells the server: picklable, and token texts equal to transformers' decode
(for every id, with and without `clean_up_tokenization_spaces`)."""

from __future__ import annotations

import copy
import pickle

import pytest

from engine.engine_info import EngineInfo
from engine.tokenizer import Tokenizer


@pytest.mark.parametrize("clean_up", [False, True])
def test_token_texts_equal_transformers_decode(tiny_offline, clean_up):
    tokenizer = copy.deepcopy(tiny_offline.get_tokenizer())
    tokenizer.clean_up_tokenization_spaces = clean_up
    info = EngineInfo.from_tokenizer(Tokenizer.from_hf(tokenizer), max_model_len=64,
                                     dtype="float32", device_type="cpu", eos_token_ids=(2,))
    token_text = pickle.loads(pickle.dumps(info)).token_text_decoder()
    ids = range(len(tokenizer))
    assert [token_text(i) for i in ids] == [tokenizer.decode([i]) for i in ids]
    assert set(info.special_token_ids) == set(tokenizer.all_special_ids)


def test_without_a_tokenizer_tokens_have_no_text():
    info = EngineInfo.from_tokenizer(None, max_model_len=64, dtype="float32",
                                     device_type="cpu", eos_token_ids=())
    assert info.token_text_decoder()(5) == ""
