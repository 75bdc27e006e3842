"""Model classes by Hugging Face `model_type`."""

from __future__ import annotations

from torch import nn

from engine.config import ModelConfig
from engine.models.llama import ForwardContext, LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    return MODEL_CLASSES[config.model_type]


__all__ = ["ForwardContext", "LlamaForCausalLM", "model_class"]
