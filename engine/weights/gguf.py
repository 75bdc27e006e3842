"""A GGUF file (llama.cpp's format): quantized tensors dequantized to the target dtype.

The tokenizer and the config come out of the file's metadata through transformers. llama.cpp's
converter permutes the rows of Llama's q and k projections; they are permuted back here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
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


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rotary halves."""
    rows = weight.shape[0]
    grouped = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return grouped.swapaxes(2, 1).reshape(weight.shape)


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

            config = AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            self._config = config.to_dict()
        return self._config

    def load_tokenizer(self) -> Any | None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)

    def _tensors(self, reader: Any) -> Iterator[tuple[str, torch.Tensor, int]]:
        from gguf.quants import dequantize

        config = self.hf_config()
        permute = config.get("model_type", "llama") in ("llama", "mistral")
        num_heads = config["num_attention_heads"]
        num_kv_heads = config.get("num_key_value_heads") or num_heads
        for tensor in reader.tensors:
            name = hf_name(tensor.name)
            if name is None:
                raise WeightsError(f"{self.uri}: unknown GGUF tensor {tensor.name!r}")
            weight = dequantize(tensor.data, tensor.tensor_type)
            if permute and name.endswith("q_proj.weight"):
                weight = unpermute_rows(weight, num_heads)
            elif permute and name.endswith("k_proj.weight"):
                weight = unpermute_rows(weight, num_kv_heads)
            yield (name, torch.from_numpy(np.require(weight, requirements=["C", "W"])),
                   int(tensor.n_bytes))

    def load_model(
        self, model_cls: type[nn.Module], config: Any, device: torch.device, dtype: torch.dtype,
        progress: LoadProgress,
    ) -> nn.Module:
        from gguf import GGUFReader

        reader = GGUFReader(str(self.path))
        model = empty_model(model_cls, config, device, dtype)
        # Progress counts the file's bytes as their tensors are dequantized into place.
        copy_tensors(model, self._tensors(reader), self.uri, progress)
        return model
