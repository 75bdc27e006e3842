"""The engine's tokenizer from a tensorized artifact's facts: what transformers' tokenizer gives
(ids, special and end ids, token texts, chat template), without importing transformers until a
chat template is wanted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.engine_info import EngineInfo
from engine.tokenizer import FACTS_FILE, Tokenizer, write_facts
from engine.weights.safetensors import load_folder_tokenizer

TEXTS = ["Hello world! Streaming tokens", "café naïve 東京 🙂", "<s>a</s> <unk> b", "", " x  y\n\n"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi 🙂"}]


@pytest.fixture
def artifact(tiny_llama_dir, tmp_path) -> Path:
    """The tokenizer files as `tensorize` leaves them: saved by transformers, facts beside."""
    load_folder_tokenizer(Path(tiny_llama_dir)).save_pretrained(str(tmp_path))
    assert write_facts(load_folder_tokenizer(tmp_path), tmp_path)
    return tmp_path


def _from_facts(folder: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_folder_facts(folder, lambda: load_folder_tokenizer(folder))
    assert tokenizer is not None
    return tokenizer


@pytest.mark.parametrize("clean_up", [False, True])
def test_facts_give_what_transformers_gives(artifact, clean_up):
    if clean_up:  # transformers' decode then changes some token texts: the facts carry them
        config_path = artifact / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
        assert write_facts(load_folder_tokenizer(artifact), artifact)
    reference = load_folder_tokenizer(artifact)
    ours = _from_facts(artifact)
    for text in TEXTS:
        for add_special_tokens in (True, False):
            assert ours.encode(text, add_special_tokens) == reference.encode(
                text, add_special_tokens=add_special_tokens)
    assert ours.eos_token_id == reference.eos_token_id
    assert set(ours.facts.special_token_ids) == set(reference.all_special_ids)
    assert ours.get_vocab() == reference.get_vocab()
    info = EngineInfo.from_tokenizer(ours, max_model_len=64, dtype="float32",
                                     device_type="cpu", eos_token_ids=(2,))
    token_text = info.token_text_decoder()
    ids = range(len(reference))
    assert [token_text(i) for i in ids] == [reference.decode([i]) for i in ids]
    assert not ours.is_hf_loaded
    assert ours.hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True) == \
        reference.apply_chat_template(MESSAGES, add_generation_prompt=True)


def test_encoding_from_facts_imports_no_transformers(artifact):
    """The point of the facts: a cold start's tokenizer costs no `import transformers`."""
    script = f"""
import sys
from pathlib import Path
from engine.tokenizer import Tokenizer
tokenizer = Tokenizer.from_folder_facts(Path({str(artifact)!r}), lambda: None)
ids = tokenizer.encode("Hello world")
assert ids and tokenizer.eos_token_id is not None
print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def _truncated(backend: dict, config: dict) -> None:
    backend["truncation"] = {"direction": "Right", "max_length": 7, "strategy": "LongestFirst",
                             "stride": 0}


def _no_post_processor_but_bos_asked(backend: dict, config: dict) -> None:
    backend["post_processor"] = None
    config["add_bos_token"] = True


def _extra_added_token_in_config(backend: dict, config: dict) -> None:
    config.setdefault("added_tokens_decoder", {})["383"] = {
        "content": "<extra>", "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": True}


@pytest.mark.parametrize("change", [_truncated, _no_post_processor_but_bos_asked,
                                    _extra_added_token_in_config])
def test_facts_only_where_the_backend_encodes_as_transformers(artifact, change):
    """Files that transformers reads otherwise than `tokenizers` does: either no facts (the
    engine loads transformers' tokenizer), or facts whose encoding is transformers'."""
    backend_path, config_path = artifact / "tokenizer.json", artifact / "tokenizer_config.json"
    backend, config = json.loads(backend_path.read_text()), json.loads(config_path.read_text())
    change(backend, config)
    backend_path.write_text(json.dumps(backend))
    config_path.write_text(json.dumps(config))
    (artifact / FACTS_FILE).unlink()
    reference = load_folder_tokenizer(artifact)
    if not write_facts(reference, artifact):
        assert Tokenizer.from_folder_facts(artifact, lambda: reference) is None
        fallback = Tokenizer.from_hf(reference)  # what the engine loads instead
        for text in TEXTS:
            assert fallback.encode(text) == reference.encode(text)
        return
    ours = _from_facts(artifact)
    for text in [*TEXTS, "word " * 50, "<extra> <s>"]:
        for add_special_tokens in (True, False):
            assert ours.encode(text, add_special_tokens) == reference.encode(
                text, add_special_tokens=add_special_tokens)
    assert set(ours.facts.special_token_ids) == set(reference.all_special_ids)


def test_facts_of_another_version_are_ignored(artifact, tmp_path):
    facts = json.loads((artifact / FACTS_FILE).read_text())
    other = tmp_path / "other"
    shutil.copytree(artifact, other)
    (other / FACTS_FILE).write_text(json.dumps({**facts, "version": 999}))
    assert Tokenizer.from_folder_facts(other, lambda: None) is None


def test_preload_loads_transformers_tokenizer_once(artifact):
    calls = []
    tokenizer = Tokenizer.from_folder_facts(
        artifact, lambda: calls.append(1) or load_folder_tokenizer(artifact))
    from tests.polling import eventually

    tokenizer.preload()
    tokenizer.preload()
    eventually(lambda: tokenizer.is_hf_loaded, max_s=60)
    tokenizer.preload()
    assert tokenizer.hf_tokenizer is not None and calls == [1]


def test_the_longest_token_comes_with_the_facts_or_from_the_vocabulary(artifact, tmp_path):
    """The input limits' longest token (characters): written with the facts; facts written
    before it carried it are read the same, the length then taken from the vocabulary."""
    expected = max(len(piece) for piece in load_folder_tokenizer(artifact).get_vocab())
    assert json.loads((artifact / FACTS_FILE).read_text())["max_token_chars"] == expected
    assert _from_facts(artifact).max_token_chars() == expected
    facts = json.loads((artifact / FACTS_FILE).read_text())
    del facts["max_token_chars"]
    older = tmp_path / "older"
    shutil.copytree(artifact, older)
    (older / FACTS_FILE).write_text(json.dumps(facts))
    tokenizer = _from_facts(older)
    assert tokenizer.facts.max_token_chars is None and tokenizer.max_token_chars() == expected
