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
    detok = IncrementalDetokenizer(llm.engine.tokenizer.backend, SamplingParams())
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
    detok = IncrementalDetokenizer(llm.engine.tokenizer.backend,
                                   SamplingParams(stop=["brown fox j"]))
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


def _stream(llm, prompt: str, params: SamplingParams) -> tuple[list, object]:
    """Every step's output of one request, and the last one."""
    llm.engine.add_request("stop-test", prompt, params)
    steps = []
    while llm.engine.has_unfinished_requests():
        steps += [o.outputs[0] for o in llm.engine.step()]
    return steps, steps[-1]


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_strings_end_text_tokens_and_logprobs_together(llm, include_stop):
    """Wherever a stop string begins (inside a token or at its start), the text, the tokens, their
    spans and logprobs agree, streamed and whole; with `include_stop_str_in_output` the text is
    every token's text, stop string included (what TGI answers)."""
    tokenizer = llm.get_tokenizer()
    prompt = "The capital of France is"
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    [reference] = llm.generate([prompt], greedy)
    ref_ids, ref_text = reference.token_ids, reference.text
    starts = [len(tokenizer.decode(ref_ids[:i])) for i in range(len(ref_ids))]
    for cut in sorted({starts[3], starts[3] + 1, starts[6] + 2, starts[9]}):
        stop = ref_text[cut : cut + 4]
        cut = ref_text.index(stop)
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0,
                                stop=[stop], include_stop_str_in_output=include_stop)
        steps, last = _stream(llm, prompt, params)
        num_completing = next(i + 1 for i in range(len(ref_ids))
                              if stop in tokenizer.decode(ref_ids[: i + 1]))
        if include_stop:
            expected_ids = ref_ids[:num_completing]
            assert last.text == tokenizer.decode(expected_ids)
        else:
            expected_ids = ref_ids[: sum(1 for s in starts[:num_completing] if s < cut)]
            assert last.text == ref_text[:cut]
        assert (last.finish_reason, last.stop_reason) == ("stop", stop)
        assert last.token_ids == expected_ids
        assert "".join(last.token_texts) == last.text
        assert [e["token_id"] for e in last.logprobs] == expected_ids
        assert [t for s in steps for t in s.delta_token_ids] == expected_ids
        assert "".join(t for s in steps for t in s.delta_token_texts) == last.text
        assert "".join(s.delta_text for s in steps) == last.text
        assert len([e for s in steps for e in s.delta_logprobs]) == len(expected_ids)


def test_stop_strings_wait_for_min_tokens(llm):
    prompt = "The capital of France is"
    [reference] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12,
                                                        ignore_eos=True))
    stop = reference.text[:3]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop],
                            min_tokens=6)
    [out] = llm.generate([prompt], params)
    assert out.token_ids[:6] == reference.token_ids[:6]
    assert out.text.startswith(reference.text[: len(stop)])
