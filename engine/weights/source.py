"""The one loading interface every weight format implements, and load progress.

A source knows its Hugging Face config, its tokenizer files and how to put its tensors into a
model built on the meta device: each tensor lands once, on the target device, in the target dtype.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class WeightsError(RuntimeError):
    """A model's weights could not be loaded; the message names the source and the cause."""


class ConfigMismatchError(WeightsError):
    """The weights do not fit the architecture in the config."""


@dataclass
class LoadProgress:
    """Observable while a load runs (another thread reads it): phase, bytes, total, throughput.

    Phases in order: config, tokenizer, weights, kv_cache, then ready. The total is known from
    the first moment (file sizes, or the S3 object's), so bytes count up from 0 of the total.
    """

    total_bytes: int = 0
    loaded_bytes: int = 0
    phase: str = "starting"
    started_at: float | None = None
    finished_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self, total_bytes: int) -> None:
        with self._lock:
            self.total_bytes, self.loaded_bytes = total_bytes, 0
            self.started_at, self.finished_at = time.monotonic(), None

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.phase = phase

    def advance(self, num_bytes: int) -> None:
        with self._lock:
            self.loaded_bytes += num_bytes

    def set_loaded(self, num_bytes: int) -> None:
        with self._lock:
            self.loaded_bytes = num_bytes

    def finish(self) -> None:
        with self._lock:
            self.loaded_bytes = max(self.loaded_bytes, self.total_bytes)
            self.finished_at = time.monotonic()
            self.phase = "ready"

    @property
    def elapsed_s(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.monotonic()) - self.started_at

    def snapshot(self) -> dict[str, Any]:
        elapsed = self.elapsed_s
        return {
            "phase": self.phase,
            "loaded_bytes": self.loaded_bytes,
            "total_bytes": self.total_bytes,
            "elapsed_s": round(elapsed, 3),
            "throughput_gbps": round(self.loaded_bytes / elapsed / 1e9, 3) if elapsed else 0.0,
        }


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

    def generation_config(self) -> dict[str, Any]:
        return {}

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
