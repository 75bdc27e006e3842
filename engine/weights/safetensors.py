"""A local Hugging Face folder: config.json, tokenizer files, *.safetensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from engine.weights.source import (
    LoadProgress,
    WeightsError,
    WeightSource,
    copy_tensors,
    empty_model,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


# The tokenizer classes that are tokenizer.json and nothing more (`PreTrainedTokenizerFast` is
# transformers 5's `TokenizersBackend`).
GENERIC_TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})


def load_folder_tokenizer(folder: Path) -> Any | None:
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        return None
    if _names_generic_tokenizer(folder):
        # AutoTokenizer would import `transformers.models`, which scans every model's source
        # files for its lazy imports (~0.4 s of a cold start), only to pick this same class.
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        return TokenizersBackend.from_pretrained(str(folder))
    from transformers import AutoTokenizer, PretrainedConfig

    # The model's config handed over as a plain PretrainedConfig: left to itself, AutoTokenizer
    # builds the architecture's own config class, whose import pulls in torch.distributed and
    # sympy (~1 s of a cold start), only to pick the same tokenizer class.
    extra: dict[str, Any] = {}
    if (folder / "config.json").exists():
        extra["config"] = PretrainedConfig(**read_json(folder / "config.json"))
    return AutoTokenizer.from_pretrained(str(folder), **extra)


def _names_generic_tokenizer(folder: Path) -> bool:
    config_path = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").exists() or not config_path.exists():
        return False
    return read_json(config_path).get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise WeightsError(f"{path.parent}: no {path.name}") from e
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from e


class SafetensorsSource(WeightSource):
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.uri = str(self.folder)
        self.files = sorted(self.folder.glob("*.safetensors"))
        if not self.files:
            raise WeightsError(f"{self.uri}: no *.safetensors files")

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def hf_config(self) -> dict[str, Any]:
        return read_json(self.folder / "config.json")

    def generation_config(self) -> dict[str, Any]:
        path = self.folder / "generation_config.json"
        return read_json(path) if path.exists() else {}

    def load_tokenizer(self) -> Any | None:
        return load_folder_tokenizer(self.folder)

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor, int]]:
        for path in self.files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    tensor = f.get_tensor(name)
                    yield name, tensor, tensor.numel() * tensor.element_size()

    def load_model(
        self, model_cls: type[nn.Module], config: Any, device: torch.device, dtype: torch.dtype,
        progress: LoadProgress,
    ) -> nn.Module:
        model = empty_model(model_cls, config, device, dtype)
        copy_tensors(model, self._tensors(), self.uri, progress)
        return model
