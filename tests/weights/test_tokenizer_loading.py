"""A folder's tokenizer: the generic class loaded directly must be what AutoTokenizer gives, and
a model-specific class still goes through AutoTokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.weights.safetensors import load_folder_tokenizer

TEXTS = ["Hello world! Streaming tokens", "café naïve 東京 🙂", "<s>a</s> <unk> b", ""]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi 🙂"}]


def _auto(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _same_tokenizer(ours, reference) -> None:
    assert type(ours) is type(reference)
    for text in TEXTS:
        assert ours(text).input_ids == reference(text).input_ids
        assert ours(text, add_special_tokens=False).input_ids == reference(
            text, add_special_tokens=False).input_ids
    ids = reference("café naïve 東京 <s>").input_ids
    assert ours.decode(ids) == reference.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(
        ids, skip_special_tokens=True)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=True) == \
        reference.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert ours.all_special_ids == reference.all_special_ids
    assert (ours.bos_token_id, ours.eos_token_id) == (reference.bos_token_id,
                                                      reference.eos_token_id)
    assert ours.added_tokens_decoder == reference.added_tokens_decoder


def test_generic_class_is_what_auto_tokenizer_gives(tiny_llama_dir):
    folder = Path(tiny_llama_dir)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] in {"TokenizersBackend", "PreTrainedTokenizerFast"}
    _same_tokenizer(load_folder_tokenizer(folder), _auto(folder))


@pytest.mark.parametrize("name", ["PreTrainedTokenizerFast", "GPT2Tokenizer"])
def test_other_class_names(tiny_llama_dir, tmp_path, name):
    """The older generic name takes the direct path too; a model's own class goes through
    AutoTokenizer (here GPT-2's byte-level BPE, which this vocabulary also is)."""
    for path in Path(tiny_llama_dir).glob("*"):
        if path.suffix in {".json", ".jinja", ".txt"}:
            shutil.copy(path, tmp_path / path.name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": name}))
    _same_tokenizer(load_folder_tokenizer(tmp_path), _auto(tmp_path))


def test_generic_class_skips_the_model_registry(tiny_llama_dir):
    """What the direct path is for: `transformers.models` (a scan of every model's files) is
    never imported."""
    code = ("import sys; from pathlib import Path; "
            "from engine.weights.safetensors import load_folder_tokenizer; "
            f"load_folder_tokenizer(Path({str(tiny_llama_dir)!r})); "
            "print('transformers.models' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "False"
