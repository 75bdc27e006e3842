"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers on the same
weights, and incremental detokenization with its real tokenizer."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.detokenizer import IncrementalDetokenizer
from tests.tiny_models import hf_default_model, hf_model_greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    return LLM("", max_model_len=2048)


@pytest.fixture(scope="module")
def hf_model():
    return hf_default_model()


def test_plain_and_chat_prompts_match_transformers(llm, hf_model):
    tokenizer = llm.get_tokenizer()
    plain = tokenizer.encode("The capital of France is")
    chat_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colors."}], add_generation_prompt=True,
        tokenize=False,
    )
    chat = tokenizer.encode(chat_text, add_special_tokens=False)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outputs = llm.generate([plain, chat], params)
    assert outputs[0].token_ids == hf_model_greedy(hf_model, plain, 32)
    assert outputs[1].token_ids == hf_model_greedy(hf_model, chat, 32)
    assert outputs[0].text == tokenizer.decode(outputs[0].token_ids, skip_special_tokens=True)


def test_streamed_text_never_breaks_utf8(llm):
    tokenizer = llm.get_tokenizer()
    text = "Voilà: naïve café, 東京の天気 🙂🚀 — done."
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(llm.engine.tokenizer, SamplingParams())
    deltas = []
    for token_id in ids:
        detok.add_token(token_id)
        deltas.append(detok.take_delta(is_finished=False))
    deltas.append(detok.take_delta(is_finished=True))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)


def test_stop_string_across_tokens_is_cut_and_never_streamed(llm):
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog")
    detok = IncrementalDetokenizer(llm.engine.tokenizer, SamplingParams(stop=["brown fox j"]))
    streamed, hit = "", None
    for token_id in ids:
        hit = detok.add_token(token_id)
        streamed += detok.take_delta(is_finished=hit is not None)
        if hit:
            break
    assert hit == "brown fox j"
    assert detok.text == "The quick "
    assert streamed == "The quick "


def test_engine_stops_on_a_stop_string(llm):
    params = SamplingParams(temperature=0.0, max_tokens=32, stop=["\n"])
    [out] = llm.generate(["The capital of France is"], params)
    assert out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == "\n"
    assert "\n" not in out.text and out.text.strip()
