"""A continuous-batching PagedAttention engine for Llama-family models."""

from engine.async_engine import AsyncLLM, EngineDeadError, QueueFullError
from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine, RequestError
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "CompletionOutput",
    "EngineConfig",
    "EngineDeadError",
    "LLMEngine",
    "ModelConfig",
    "QueueFullError",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
]
