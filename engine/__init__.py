"""A continuous-batching PagedAttention engine for Llama-family models.

Names are imported on first use (PEP 562): the server reaches `SamplingParams`, the outputs and
the background loader without importing torch, and answers /ping while torch loads.
"""

from __future__ import annotations

from engine.lazy import lazy_names

_MODULE_OF = {
    "AsyncEngineClient": "engine.async_engine",
    "AsyncLLM": "engine.async_engine",
    "EngineDeadError": "engine.async_engine",
    "QueueFullError": "engine.async_engine",
    "RequestCancelledError": "engine.async_engine",
    "RequestFailedError": "engine.async_engine",
    "RequestStream": "engine.async_engine",
    "BackgroundLoader": "engine.background",
    "LoadState": "engine.background",
    "EngineConfig": "engine.config",
    "EngineInfo": "engine.engine_info",
    "EngineProcessClient": "engine.process_client",
    "ModelConfig": "engine.config",
    "RequestError": "engine.input_processor",
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "LoadProgress": "engine.load_progress",
    "CompletionOutput": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
    "SpeculativeConfig": "engine.config",
}

__all__ = sorted(_MODULE_OF)

__getattr__, __dir__ = lazy_names(__name__, _MODULE_OF)
