"""The GGUF source against transformers' and gguf's own readings of the same files: the config
as `AutoConfig` builds it, the tokenizer as `AutoTokenizer` builds it, every tensor as gguf's
numpy dequantization gives it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.weights import default_model_path
from engine.weights.gguf import GGUFSource, hf_name, unpermute_rows

gguf = pytest.importorskip("gguf")


def _reference_config(path: Path) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    config.pop("_name_or_path")
    return config


def _ours(path: Path) -> dict:
    config = dict(GGUFSource(path).hf_config())
    config.pop("_name_or_path")
    return config


def _write_gguf(path: Path, architecture: str, name: str, tied: bool) -> Path:
    """A metadata-only model file: the config keys llama.cpp writes, two tiny tensors."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(32)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", np.zeros((32, 64), dtype=np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.zeros((32, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_embedded_config_is_transformers_config():
    assert _ours(default_model_path()) == _reference_config(default_model_path())


@pytest.mark.parametrize(
    "architecture, name, tied",
    [("llama", "tiny", True), ("llama", "mistral", False), ("qwen2", "tiny-qwen", False)],
)
def test_written_config_is_transformers_config(tmp_path, architecture, name, tied):
    path = _write_gguf(tmp_path / "model.gguf", architecture, name, tied)
    ours = _ours(path)
    assert ours == _reference_config(path)
    assert ours["model_type"] == ("mistral" if name == "mistral" else architecture)


def test_tokenizer_is_auto_tokenizers():
    from transformers import AutoTokenizer

    path = default_model_path()
    ours = GGUFSource(path).load_tokenizer()
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = ["Hello, world!", "<|im_start|>user\nnaïve café 東京 🙂<|im_end|>", "  two  spaces\n\n"]
    for text in texts:
        assert ours(text).input_ids == reference(text).input_ids
    messages = [{"role": "user", "content": "Name three colors."}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (
        reference.bos_token, reference.eos_token, reference.pad_token
    )


def test_every_tensor_is_gguf_dequantization():
    from transformers.integrations.gguf import GgufHeader

    path = default_model_path()
    source = GGUFSource(path)
    config = source.hf_config()
    ours = {name: tensor for name, tensor, _ in source._tensors(GgufHeader.from_file(str(path)))}
    reader = gguf.GGUFReader(str(path))
    assert len(ours) == len(reader.tensors)
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        expected = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy())
        if name.endswith("q_proj.weight"):
            expected = unpermute_rows(expected, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            expected = unpermute_rows(expected, config["num_key_value_heads"])
        assert ours[name].dtype == torch.float32
        torch.testing.assert_close(ours[name], expected, rtol=0, atol=0, msg=name)
