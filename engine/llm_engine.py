"""The engine: requests in, one continuous-batching step at a time, outputs out.

`add_request / step / abort` as in vLLM. Not thread-safe: one thread drives it (the offline `LLM`
or the asyncio front's engine thread); `prepare_request` alone may run on any thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.block_manager import BlockManager, cdiv
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.layers.attention import get_attention_backend
from engine.model_runner import ModelRunner, kv_bytes_per_block
from engine.models import model_class
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.sampler import Sampler, SampleResult
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import FinishReason, Sequence
from engine.weights import LoadProgress, open_source

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_MEMORY = 1 << 30
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RequestError(ValueError):
    """A request the engine refuses: it could never run, or its input is invalid."""


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    metrics: RequestMetrics
    num_reported_tokens: list[int] = field(default_factory=list)

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


def resolve_dtype(requested: str, model_dtype: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return TORCH_DTYPES[requested]
    if device.type == "cpu":
        return torch.float32  # fp32 matmuls are the fast ones on most CPUs
    return TORCH_DTYPES.get(model_dtype.removeprefix("torch."), torch.bfloat16)


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: LoadProgress | None = None):
        self.config = config
        torch.manual_seed(config.seed)  # unseeded requests: reproducible from start, as vLLM
        self.progress = progress or LoadProgress()
        self.device = torch.device(config.resolved_device)
        source = open_source(config.model, config.s3_endpoint, config.verify_weights)
        self.model_config = ModelConfig.from_hf(source.hf_config())
        self.dtype = resolve_dtype(config.dtype, self.model_config.torch_dtype, self.device)
        self.max_model_len = self._max_model_len()
        self.hf_tokenizer = source.load_tokenizer()
        self.tokenizer = getattr(self.hf_tokenizer, "backend_tokenizer", None)
        self.eos_token_ids = self._eos_token_ids(source.generation_config())
        start = time.monotonic()
        model = source.load_model(
            model_class(self.model_config), self.model_config, self.device, self.dtype,
            self.progress,
        )
        self.load_seconds = time.monotonic() - start
        logger.info(
            "loaded %s (%s, %.1f M params) in %.2f s", source.uri, self.dtype,
            self.model_config.num_params / 1e6, self.load_seconds,
        )
        self.cache_config = CacheConfig(
            config.block_size, self._num_blocks(), config.enable_prefix_caching
        )
        self.block_manager = BlockManager(
            self.cache_config.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len),
            self.block_manager,
        )
        backend = get_attention_backend(config.resolved_attention_backend)
        self.runner = ModelRunner(
            model.eval(), self.model_config, self.cache_config, self.max_model_len, self.device,
            self.dtype, backend,
        )
        self.sampler = Sampler(self.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.num_prompt_tokens_computed = 0
        self.num_generation_tokens = 0

    # -- setup ----------------------------------------------------------------------------------

    def _max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        if self.config.max_model_len is not None and self.config.max_model_len > limit:
            raise ValueError(
                f"max_model_len {self.config.max_model_len} exceeds the model's "
                f"max_position_embeddings {limit}"
            )
        max_len = self.config.max_model_len or limit
        window = self.model_config.sliding_window
        if window is not None and window < max_len:
            logger.warning("max_model_len capped to the sliding window (%d tokens)", window)
            max_len = window
        return max_len

    def _eos_token_ids(self, generation_config: dict[str, Any]) -> tuple[int, ...]:
        ids = list(self.model_config.eos_token_ids)
        extra = generation_config.get("eos_token_id")
        for token_id in extra if isinstance(extra, list) else [extra]:
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        if not ids and self.hf_tokenizer is not None and self.hf_tokenizer.eos_token_id is not None:
            ids.append(self.hf_tokenizer.eos_token_id)
        return tuple(ids)

    def _num_blocks(self) -> int:
        per_block = kv_bytes_per_block(self.model_config, self.config.block_size, self.dtype)
        if self.config.kv_cache_memory is not None:
            memory = self.config.kv_cache_memory
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            memory = int(free * self.config.gpu_memory_utilization)
        else:
            memory = DEFAULT_CPU_KV_CACHE_MEMORY
        # More blocks than every sequence at full length could use are never touched.
        useful = self.config.max_num_seqs * cdiv(self.max_model_len, self.config.block_size)
        num_blocks = min(memory // per_block, useful)
        logger.info(
            "KV cache budget %.1f MiB -> %d blocks (%d tokens)", memory / 2**20, num_blocks,
            num_blocks * self.config.block_size,
        )
        return num_blocks

    # -- requests -------------------------------------------------------------------------------

    def prepare_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams,
        arrival_time: float | None = None,
    ) -> Request:
        """Tokenize and validate; raise RequestError for a request that could never run."""
        if isinstance(prompt, str):
            if self.hf_tokenizer is None:
                raise RequestError("this model has no tokenizer: send token ids")
            prompt_text, prompt_token_ids = prompt, self.hf_tokenizer.encode(prompt)
        else:
            prompt_text, prompt_token_ids = None, list(prompt)
        self._validate(prompt_token_ids, params)
        arrival = arrival_time or time.monotonic()
        seqs: list[Sequence] = []
        for index in range(params.n):
            parent = seqs[0] if seqs else None
            seqs.append(Sequence(
                request_id, prompt_token_ids, params.for_sibling(index), index, arrival, parent
            ))
        detokenizers = [IncrementalDetokenizer(self.tokenizer, s.params) for s in seqs]
        return Request(
            request_id, prompt_text, prompt_token_ids, params, seqs, detokenizers,
            RequestMetrics(arrival), [0] * params.n,
        )

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise RequestError("the prompt is empty")
        vocab_size = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt_token_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab_size})")
        if num_prompt + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"prompt ({num_prompt} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the model's context length ({self.max_model_len} tokens)"
            )
        num_blocks = cdiv(num_prompt + params.max_tokens, self.config.block_size)
        if num_blocks > self.cache_config.num_blocks:
            raise RequestError(
                f"the request needs {num_blocks} KV blocks; the whole cache holds "
                f"{self.cache_config.num_blocks}"
            )

    def chat_prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The model's chat template applied to `messages`, ready to generate from.

        Raises RequestError when the model has no template or the template rejects them.
        """
        tokenizer = self.hf_tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise RequestError("this model has no chat template: send a plain prompt")
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # noqa: BLE001 - template errors come from the caller's input
            raise RequestError(f"the chat template rejected the messages: {e}") from e
        # The template already holds the special tokens (BOS included).
        return tokenizer.encode(text, add_special_tokens=False)

    def add_prepared(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise RequestError(f"request id {request.request_id!r} is already running")
        self.requests[request.request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> None:
        self.add_prepared(self.prepare_request(request_id, prompt, params or SamplingParams()))

    def abort(self, request_id: str) -> None:
        """End the request now; its blocks are free when this returns."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            self.scheduler.finish(seq, FinishReason.ABORT)
            self.sampler.release(seq.seq_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        self._count_prompt_tokens(batch)
        logits, sample_seqs = self.runner.execute(batch)
        self.scheduler.update_after_step(batch)
        results = self.sampler(logits, sample_seqs)
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for seq, result in zip(sample_seqs, results, strict=True):
            request = self.requests[seq.request_id]
            self._append_token(request, seq, result, now)
            touched[seq.request_id] = request
        outputs = [self._make_output(request, now) for request in touched.values()]
        for output in outputs:
            if output.finished:
                del self.requests[output.request_id]
        return outputs

    def _count_prompt_tokens(self, batch: ScheduledBatch) -> None:
        now = time.monotonic()
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            self.num_prompt_tokens_computed += max(0, min(start + num_new, seq.num_prompt_tokens)
                                                   - start)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now

    def _append_token(
        self, request: Request, seq: Sequence, result: SampleResult, now: float
    ) -> None:
        seq.append_token(result.token_id)
        self.num_generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        if result.logprob is not None:
            seq.cumulative_logprob += result.logprob
            seq.logprobs.append({
                "token_id": result.token_id, "logprob": result.logprob,
                "top_logprobs": result.top_logprobs or {},
            })
        stop_string = request.detokenizers[seq.index].add_token(result.token_id)
        reason = self._finish_reason(seq, result.token_id, stop_string)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.sampler.release(seq.seq_id)

    def _finish_reason(
        self, seq: Sequence, token_id: int, stop_string: str | None
    ) -> FinishReason | None:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token_id in self.eos_token_ids:
                return FinishReason.STOP
            if token_id in p.stop_token_ids:
                seq.stop_reason = token_id
                return FinishReason.STOP
            if stop_string is not None:
                seq.stop_reason = stop_string
                return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _make_output(self, request: Request, now: float) -> RequestOutput:
        completions = []
        for seq, detok in zip(request.seqs, request.detokenizers, strict=True):
            num_reported = request.num_reported_tokens[seq.index]
            request.num_reported_tokens[seq.index] = seq.num_output_tokens
            delta_text = detok.take_delta(seq.is_finished)
            wants_logprobs = seq.params.logprobs is not None
            completions.append(CompletionOutput(
                index=seq.index,
                text=detok.text[: detok.num_emitted_chars],
                token_ids=seq.output_token_ids,
                finish_reason=str(seq.finish_reason) if seq.finish_reason else None,
                stop_reason=seq.stop_reason,
                delta_text=delta_text,
                delta_token_ids=seq.output_token_ids[num_reported:],
                logprobs=list(seq.logprobs) if wants_logprobs else None,
                delta_logprobs=seq.logprobs[num_reported:] if wants_logprobs else None,
                cumulative_logprob=seq.cumulative_logprob if wants_logprobs else None,
            ))
        metrics = request.metrics
        first = request.seqs[0]
        metrics.first_scheduled_time = first.first_scheduled_time
        metrics.first_token_time = first.first_token_time
        if request.is_finished:
            metrics.finished_time = now
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, completions,
            request.is_finished, first.num_cached_tokens, metrics,
        )

    # -- observability --------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": bm.usage,
            "num_free_blocks": bm.num_free_blocks,
            "num_blocks": bm.num_blocks,
            "prefix_cache_query_tokens": bm.num_prefix_query_tokens,
            "prefix_cache_hit_tokens": bm.num_prefix_hit_tokens,
            "prompt_tokens": self.num_prompt_tokens_computed,
            "generation_tokens": self.num_generation_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
        }
