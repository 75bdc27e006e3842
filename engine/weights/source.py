"""The one loading interface every weight format implements.

A source knows its Hugging Face config, its tokenizer files and how to put its tensors into a
model built on the meta device: each tensor lands once, on the target device, in the target dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.load_progress import LoadProgress
from engine.weights.errors import WeightsError

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer


class ConfigMismatchError(WeightsError):
    """The weights do not fit the architecture in the config."""


class WeightSource(ABC):
    uri: str

    @abstractmethod
    def total_bytes(self) -> int:
        """Bytes of weights to read, known before reading any (for progress)."""

    @abstractmethod
    def hf_config(self) -> dict[str, Any]:
        """The model's `config.json` as a dict."""

    @abstractmethod
    def load_tokenizer(self) -> Any | None:
        """A transformers tokenizer, or None if the source ships no tokenizer files."""

    def tokenizer(self) -> Tokenizer | None:
        """The engine's tokenizer (transformers' wrapped), or None without tokenizer files."""
        from engine.tokenizer import Tokenizer

        hf_tokenizer = self.load_tokenizer()
        return Tokenizer.from_hf(hf_tokenizer) if hf_tokenizer is not None else None

    def generation_config(self) -> dict[str, Any]:
        return {}

    def use_rank(self, tp: Any) -> None:
        """The tensor-parallel rank this source loads for. Only per-rank artifacts care; from
        any other source every rank loads the whole model and the engine cuts its share."""
        return None

    @abstractmethod
    def load_model(
        self, model_cls: type[nn.Module], config: Any, device: torch.device, dtype: torch.dtype,
        progress: LoadProgress,
    ) -> nn.Module:
        """Build `model_cls(config)` without allocating weights, then place each tensor once."""


def empty_model(
    model_cls: type[nn.Module], config: Any, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """The model with uninitialized parameters on `device`: one allocation per parameter."""
    with torch.device("meta"):
        model = model_cls(config)
    return model.to(dtype=dtype).to_empty(device=device)


def copy_tensors(
    model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor, int]], uri: str,
    progress: LoadProgress,
) -> None:
    """Copy (Hugging Face name, tensor, bytes read for it) into `model`; every parameter must
    be written."""
    params = dict(model.named_parameters())
    rows_written = {name: 0 for name in params}
    for hf_name, tensor, num_source_bytes in tensors:
        name, start, num_rows = model.packed_slice(hf_name)
        if name not in params:
            if name == "lm_head.weight" and model.lm_head is None:
                continue  # a tied head stored anyway
            if "rotary_emb" in name:
                continue
            raise ConfigMismatchError(f"{uri}: weight {hf_name!r} has no place in the model")
        param = params[name]
        target = param.data if num_rows < 0 else param.data[start : start + num_rows]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ConfigMismatchError(
                f"{uri}: weight {hf_name!r} has shape {tuple(tensor.shape)}, "
                f"the config expects {tuple(target.shape)}"
            )
        target.copy_(tensor)
        rows_written[name] += target.shape[0] if target.dim() else 1
        progress.advance(num_source_bytes)
    missing = [n for n, p in params.items() if rows_written[n] < (p.shape[0] if p.dim() else 1)]
    if missing:
        raise ConfigMismatchError(f"{uri}: no weights for {', '.join(missing[:5])}")
