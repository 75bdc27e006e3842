"""A continuous-batching PagedAttention engine for Llama-family models.

Names are imported on first use (PEP 562): the server reaches `SamplingParams`, the outputs and
the background loader without importing torch, and answers /ping while torch loads.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "AsyncLLM": "engine.async_engine",
    "EngineDeadError": "engine.async_engine",
    "QueueFullError": "engine.async_engine",
    "RequestCancelledError": "engine.async_engine",
    "RequestFailedError": "engine.async_engine",
    "RequestStream": "engine.async_engine",
    "BackgroundLoader": "engine.background",
    "LoadState": "engine.background",
    "EngineConfig": "engine.config",
    "ModelConfig": "engine.config",
    "RequestError": "engine.input_processor",
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "LoadProgress": "engine.load_progress",
    "CompletionOutput": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
