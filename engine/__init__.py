"""A continuous-batching PagedAttention engine for Llama-family models."""

from engine.async_engine import (
    AsyncLLM,
    EngineDeadError,
    QueueFullError,
    RequestCancelledError,
    RequestFailedError,
    RequestStream,
)
from engine.background import BackgroundLoader, LoadState
from engine.config import EngineConfig, ModelConfig
from engine.input_processor import RequestError
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "BackgroundLoader",
    "CompletionOutput",
    "EngineConfig",
    "EngineDeadError",
    "LLMEngine",
    "LoadState",
    "ModelConfig",
    "QueueFullError",
    "RequestCancelledError",
    "RequestError",
    "RequestFailedError",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
]
