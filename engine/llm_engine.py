"""The engine: requests in, one continuous-batching step at a time, outputs out.

`add_request / step / abort` as in vLLM, over three parts as vLLM v1 splits them: the input
processor (tokenize, validate against the model), the engine core (schedule, run, sample) and the
output processor (detokenize, stop strings, typed outputs). Not thread-safe: one thread drives
`step` (the offline `LLM` or the asyncio front's engine thread); `process_inputs` alone may run on
any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from engine.block_manager import BlockManager, cdiv
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.distributed.executor import MultiprocExecutor
from engine.distributed.sharding import check_divisible, shard_model
from engine.distributed.tensor_parallel import SINGLE, TensorParallel, init_tensor_parallel
from engine.distributed.worker import rank_model_config, threads_per_rank
from engine.engine_core import EngineCore
from engine.engine_info import EngineInfo
from engine.input_processor import EngineRequest, InputLimits, InputProcessor, RequestError
from engine.kernels import cpu_ops
from engine.kv_cache import allocate_kv_cache, fault_in_first_blocks, kv_bytes_per_block
from engine.layers.attention import get_attention_backend
from engine.layers.linear import INT8_ACTIVATIONS, has_native_bf16
from engine.model_runner import ModelRunner
from engine.models import model_class
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import FinishReason
from engine.weights import LoadProgress, open_source

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_MEMORY = 1 << 30
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = ["LLMEngine", "RequestError", "WorkerDiedError"]


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process is gone."""


def resolve_dtype(requested: str, model_dtype: str, device: torch.device,
                  quantization: str | None = None) -> torch.dtype:
    """"auto" on the CPU: fp32, whose matmuls are the fast ones on most CPUs, except bf16 for
    int8 activations (w8a8, w4a8) where the CPU has native bf16: their linears multiply in int8
    whatever the dtype, and bf16 halves what the rest of the step reads (the KV cache above all):
    SmolLM2 w4a8 on a Zen 4, 32 clients, 506 against 353 tok/s (1 and 8 clients within the
    noise). On a GPU, the model's dtype."""
    if requested != "auto":
        return TORCH_DTYPES[requested]
    if device.type == "cpu":
        if quantization in INT8_ACTIVATIONS and has_native_bf16():
            return torch.bfloat16
        return torch.float32
    return TORCH_DTYPES.get(model_dtype.removeprefix("torch."), torch.bfloat16)


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: LoadProgress | None = None,
                 early_read: Any = None):
        """`early_read`: the weights and side files of an s3:// model, already coming."""
        self.config = config
        torch.manual_seed(config.seed)  # unseeded requests: reproducible from start, as vLLM
        self.progress = progress or LoadProgress()
        self.device = torch.device(config.resolved_device)
        source = open_source(config.model, config.s3_endpoint, config.verify_weights,
                             early_read)
        self.progress.start(source.total_bytes())
        self.progress.set_phase("config")
        self.model_config = ModelConfig.from_hf(source.hf_config())
        self.tp, self.executor = self._start_tensor_parallel()
        source.use_rank(self.tp)
        try:
            self._build(source, config)
        except BaseException:
            self.shutdown()  # workers already started must not outlive a failed start
            raise

    def _build(self, source: Any, config: EngineConfig) -> None:
        """Everything after the ranks are started: tokenizer, weights, cache, the step's parts."""
        self.dtype = resolve_dtype(config.dtype, self.model_config.torch_dtype, self.device,
                                   config.quantization)
        self.max_model_len = self._max_model_len()
        early_kv_cache = self._early_kv_cache()
        # The tokenizer (from a tensorized artifact ~0.1 s; else import transformers ~0.8 s, then
        # its files) loads on a thread beside the weights, whose copies and checksums mostly run
        # without the GIL: off the path to ready.
        with ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as pool:
            tokenizer = pool.submit(source.tokenizer)
            self.progress.set_phase("weights")
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
            self.progress.set_phase("tokenizer")  # what is left of it, if anything
            self.tokenizer = tokenizer.result()
        self.eos_token_ids = self._eos_token_ids(source.generation_config())
        shard_model(model, self.tp)
        self.rank_model_config = rank_model_config(self.model_config, self.tp.world_size)
        self.progress.set_phase("kv_cache")
        num_blocks = early_kv_cache.shape[2] if early_kv_cache is not None else self._num_blocks()
        self.cache_config = CacheConfig(config.block_size, num_blocks, config.enable_prefix_caching)
        self.block_manager = BlockManager(
            self.cache_config.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len),
            self.block_manager,
        )
        backend_name = config.resolved_attention_backend
        is_cpu_pending = backend_name == "cpu" and not cpu_ops.is_loaded()
        if self.tp.world_size > 1:
            self.progress.set_phase("ranks")  # answered once every worker has loaded its share
            self.tp.broadcast((self.cache_config, self.max_model_len, backend_name))
            self.progress.set_phase("kv_cache")
        self.runner = ModelRunner(
            model.eval(), self.rank_model_config, self.cache_config, self.max_model_len,
            self.device, self.dtype,
            get_attention_backend("torch" if is_cpu_pending else backend_name),
            config.compile_decode, self.tp, config.quantization, early_kv_cache,
        )
        if is_cpu_pending:
            threading.Thread(target=self._load_cpu_kernels, name="cpu-kernels", daemon=True).start()
        self.core = EngineCore(self.scheduler, self.runner, Sampler(self.eos_token_ids),
                               self.eos_token_ids, self.max_model_len, config.speculative)
        self.input_processor = InputProcessor(self.tokenizer, InputLimits(
            self.model_config.vocab_size, self.max_model_len, config.block_size,
            self.cache_config.num_blocks,
        ))
        self.output_processor = OutputProcessor(
            self.tokenizer.backend if self.tokenizer is not None else None)
        self.progress.finish()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (no-op on one rank) and wait for the background
        weight move. Idempotent."""
        runner = getattr(self, "runner", None)  # None when the build failed before it
        if runner is not None:
            runner.wait_for_weight_mover(start=False)
        if self.executor is not None:
            executor, self.executor = self.executor, None
            executor.shutdown(self.tp)

    # -- setup ----------------------------------------------------------------------------------

    def _start_tensor_parallel(self) -> tuple[TensorParallel, Any]:
        """Check the model splits, start ranks 1..N-1 loading, join them as rank 0."""
        world_size = self.config.tensor_parallel_size
        if world_size == 1:
            return SINGLE, None
        check_divisible(self.model_config, world_size)
        torch.set_num_threads(threads_per_rank(world_size))
        if self.config.distributed_executor_backend == "ray":
            from engine.distributed.ray_executor import RayExecutor

            executor = RayExecutor(self.config)
        else:
            executor = MultiprocExecutor(self.config)
        try:
            return init_tensor_parallel(0, world_size, executor.init_method, self.device), executor
        except Exception:
            executor.shutdown(SINGLE)
            raise

    def _load_cpu_kernels(self) -> None:
        """Off the start's path: a cached library loads in milliseconds, a first build takes
        ~20 s of one core. The next step takes the new backend; the references serve until then
        (and for good if there is no compiler)."""
        if cpu_ops.load():
            self.runner.backend = get_attention_backend("cpu")
            logger.info("attention: C++ CPU kernels (%s)", cpu_ops.capability())
            quantization = self.config.quantization
            if (quantization in ("w8a8", "w4a8")
                    and torch.ops.llm_cpu.int8_activation_path() == "scalar"):
                logger.warning("--quantization %s: this CPU has neither AVX512-VNNI nor AVX2, so "
                               "its int8 products run one at a time (correct, slow); int8 or int4 "
                               "is the fast choice here", quantization)

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
        if not ids and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(ids)

    def _early_kv_cache(self) -> torch.Tensor | None:
        """On the CPU, on one rank (where its size does not wait for the weights), the KV cache
        before the weights load, its first blocks faulted in meanwhile (engine/kv_cache.py)."""
        if self.device.type != "cpu" or self.tp.world_size > 1:
            return None
        cache = allocate_kv_cache(self.model_config, self._num_blocks(self.model_config),
                                  self.config.block_size, self.dtype, self.device)
        fault_in_first_blocks(cache)
        return cache

    def _num_blocks(self, model_config: ModelConfig | None = None) -> int:
        per_block = kv_bytes_per_block(model_config or self.rank_model_config,
                                       self.config.block_size, self.dtype)
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

    def process_inputs(
        self, request_id: str, prompt: str | list[int], params: SamplingParams,
        arrival_time: float | None = None,
    ) -> EngineRequest:
        """Tokenize and validate (any thread); raise RequestError for a request that could
        never run."""
        return self.input_processor.process(
            request_id, prompt, params, arrival_time or time.monotonic()
        )

    def chat_prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The model's chat template applied to `messages`; RequestError if it cannot be."""
        return self.input_processor.chat_prompt_ids(messages)

    def add_processed(self, request: EngineRequest) -> None:
        self.core.add_request(request)
        self.output_processor.add_request(request)

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> None:
        self.add_processed(self.process_inputs(request_id, prompt, params or SamplingParams()))

    def abort(self, request_id: str) -> None:
        """End the request now; its blocks are free when this returns."""
        self.core.finish_request(request_id, FinishReason.ABORT)
        self.output_processor.abort(request_id)

    def when_idle(self) -> bool:
        """What a warm server has done and no request should wait for (nor share the GIL
        with): the weights packed and moved, transformers' part of the tokenizer, for chat
        templates, the small-batch kernels' limit timed once they are, then the KV cache
        faulted in a slice a call. Called by the step loop after half a second with nothing to
        do; idempotent. True while some of it remains: the loop calls again soon."""
        self.runner.start_weight_mover()
        self.runner.calibrate_small_batch_rows()
        if self.tokenizer is not None:
            self.tokenizer.preload()
        return self.runner.prefault_kv_cache()

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    # -- the step -------------------------------------------------------------------------------

    def check_workers(self) -> None:
        """Raise WorkerDiedError if a tensor-parallel worker is gone (no-op on one rank)."""
        if self.executor is not None and (dead := self.executor.dead_worker()) is not None:
            # Without all its ranks the model cannot run: the engine stops (and /ping says why).
            raise WorkerDiedError(dead)

    def step(self) -> list[RequestOutput]:
        self.check_workers()
        processed = self.output_processor.process(self.core.step())
        for request_id, index in processed.stopped_seqs:
            self.core.finish_seq(request_id, index, FinishReason.STOP)
        for request_id in processed.failed_request_ids:
            self.core.finish_request(request_id, FinishReason.ERROR)
        return processed.outputs

    # -- observability --------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        """What the server needs to know of this engine (built once per call: ~20 ms)."""
        return EngineInfo.from_tokenizer(
            self.tokenizer, max_model_len=self.max_model_len,
            dtype=str(self.dtype).removeprefix("torch."), device_type=self.device.type,
            eos_token_ids=self.eos_token_ids,
        )

    @property
    def num_prompt_tokens_computed(self) -> int:
        return self.core.num_prompt_tokens_computed

    def stats(self) -> dict[str, float]:
        bm, speculator = self.block_manager, self.core.speculator
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": bm.usage,
            "num_free_blocks": bm.num_free_blocks,
            "num_blocks": bm.num_blocks,
            "prefix_cache_query_tokens": bm.num_prefix_query_tokens,
            "prefix_cache_hit_tokens": bm.num_prefix_hit_tokens,
            "prompt_tokens": self.core.num_prompt_tokens_computed,
            "generation_tokens": self.core.num_generation_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "spec_decode_draft_tokens": speculator.num_draft_tokens if speculator else 0,
            "spec_decode_accepted_tokens": speculator.num_accepted_tokens if speculator else 0,
            "compiled_decode_ready": self.runner.compiled_decode is not None
            and self.runner.compiled_decode.is_ready.is_set(),
        }
