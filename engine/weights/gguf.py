"""A GGUF file (llama.cpp's format): quantized tensors dequantized to the target dtype.

The tokenizer, the config and the tensors come out of the file through transformers' GGUF
reader, which maps the file and leaves the vocabulary unread until the tokenizer asks for it.
llama.cpp's converter permutes the rows of Llama's q and k projections; they are permuted back
here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.weights.source import (
    LoadProgress,
    WeightsError,
    WeightSource,
    copy_tensors,
    empty_model,
)

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_ARCHITECTURES = ("llama", "mistral", "qwen2")
_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of each head's rotary halves."""
    rows = weight.shape[0]
    grouped = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return grouped.transpose(2, 1).reshape(weight.shape)


def hf_config_dict(metadata: dict[str, Any], tensor_names: tuple[str, ...]) -> dict[str, Any]:
    """transformers' GGUF -> config keys (`GGUF_CONFIG_MAPPING`, applied as its
    `load_gguf_checkpoint` applies them for the Llama family) over its fast metadata reader.
    `AutoConfig.from_pretrained(gguf_file=...)` takes the legacy path for these architectures,
    which parses the whole vocabulary through gguf's reader: 3-5 s for SmolLM2's 49k tokens and
    merges, against 15 ms here."""
    from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    architecture = metadata["general.architecture"]
    if architecture not in _ARCHITECTURES:
        raise WeightsError(f"GGUF architecture {architecture!r} is not one of {_ARCHITECTURES}")
    # transformers' test: the name list holds exactly "mistral" (llama.cpp writes Mistral as llama)
    model_type = "mistral" if metadata.get("general.name") == "mistral" else architecture
    config: dict[str, Any] = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type) or {})
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        prefix = model_type if prefix == architecture else prefix
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed not in (None, -1):
            config[renamed] = model_type if renamed == "model_type" else value
    return config


class GGUFSource(WeightSource):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.uri = str(self.path)
        if not self.path.is_file():
            raise WeightsError(f"{self.uri}: no such GGUF file")
        self._config: dict[str, Any] | None = None

    def total_bytes(self) -> int:
        return self.path.stat().st_size

    def hf_config(self) -> dict[str, Any]:
        if self._config is None:
            from transformers import AutoConfig
            from transformers.integrations.gguf import read_gguf_metadata

            metadata, tensor_names = read_gguf_metadata(self.uri)  # the vocabulary left unread
            config = hf_config_dict(metadata, tensor_names)
            self._config = AutoConfig.for_model(**config).to_dict()
            self._config["_name_or_path"] = str(self.path.parent)  # as from_pretrained says
        return self._config

    def load_tokenizer(self) -> Any | None:
        # Not AutoTokenizer: for a GGUF it first builds the config the legacy way (above), 4 s of
        # 4.8 here; the class it then picks for these files is this one.
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(
            str(self.path.parent), gguf_file=self.path.name
        )

    def _tensors(self, header: Any) -> Iterator[tuple[str, torch.Tensor, int]]:
        from transformers.integrations.gguf import load_gguf_state_dict
        from transformers.integrations.gguf.dequant import GGML_BLOCK, dequantize

        config = self.hf_config()
        permute = config.get("model_type", "llama") in ("llama", "mistral")
        num_heads = config["num_attention_heads"]
        num_kv_heads = config.get("num_key_value_heads") or num_heads
        lazy_tensors = load_gguf_state_dict(header)
        for info in header.tensors:
            name = hf_name(info.name)
            if name is None:
                raise WeightsError(f"{self.uri}: unknown GGUF tensor {info.name!r}")
            lazy = lazy_tensors[info.name]
            if info.ggml_type in GGML_BLOCK:  # blocks of quantized values, read from the mapping
                raw = torch.from_numpy(lazy.data.copy())  # the mapping is read-only; torch warns
                flat = dequantize(raw, info.ggml_type, torch.float32)
                weight = flat.reshape(info.shape)
            else:  # plain floats: the lazy tensor copies them out and views them in their type
                weight = lazy[...]
            if permute and name.endswith("q_proj.weight"):
                weight = unpermute_rows(weight, num_heads)
            elif permute and name.endswith("k_proj.weight"):
                weight = unpermute_rows(weight, num_kv_heads)
            yield name, weight, int(info.nbytes)

    def load_model(
        self, model_cls: type[nn.Module], config: Any, device: torch.device, dtype: torch.dtype,
        progress: LoadProgress,
    ) -> nn.Module:
        from transformers.integrations.gguf import GgufHeader

        header = GgufHeader.from_file(self.uri)  # metadata and tensor table; no tensor data read
        model = empty_model(model_cls, config, device, dtype)
        # Progress counts the file's bytes as their tensors are dequantized into place.
        copy_tensors(model, self._tensors(header), self.uri, progress)
        return model
