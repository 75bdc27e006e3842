"""The loop of a non-driver rank: load the model, keep its share, then run each step's forward
on the inputs the driver broadcasts, until the driver broadcasts None.

It runs in its own process (engine/distributed/executor.py starts it) and never schedules: the
collectives inside the forward pair up with the driver's, step by step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

import torch

from engine.config import EngineConfig, ModelConfig
from engine.distributed.sharding import local_kv_heads, shard_model
from engine.distributed.tensor_parallel import init_tensor_parallel

logger = logging.getLogger(__name__)


def rank_model_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """One rank's share of the architecture: its heads and its slice of the MLP."""
    if world_size == 1:
        return config
    return dataclasses.replace(
        config, num_heads=config.num_heads // world_size,
        num_kv_heads=local_kv_heads(config, world_size),
        intermediate_size=config.intermediate_size // world_size,
    )


def threads_per_rank(world_size: int) -> int:
    """The cores split between the ranks of this host (each rank computes at once)."""
    return max(1, (os.cpu_count() or 1) // world_size)


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    device = torch.device(config.resolved_device)
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _exit_with_parent() -> None:
    """A worker whose driver is gone (killed, not stopped) exits instead of waiting forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_worker(config: EngineConfig, rank: int, world_size: int, init_method: str) -> None:
    from engine.kernels import cpu_ops
    from engine.layers.attention import get_attention_backend
    from engine.llm_engine import resolve_dtype
    from engine.load_progress import LoadProgress
    from engine.model_runner import ModelRunner
    from engine.models import model_class
    from engine.weights import open_source

    _exit_with_parent()
    torch.set_num_threads(threads_per_rank(world_size))
    torch.manual_seed(config.seed)
    device = rank_device(config, rank)
    tp = init_tensor_parallel(rank, world_size, init_method, device)
    source = open_source(config.model, config.s3_endpoint, config.verify_weights)
    source.use_rank(tp)
    model_config = ModelConfig.from_hf(source.hf_config())
    dtype = resolve_dtype(config.dtype, model_config.torch_dtype, device, config.quantization)
    model = source.load_model(model_class(model_config), model_config, device, dtype,
                              LoadProgress())
    shard_model(model, tp)
    setup = tp.broadcast()
    if setup is None:  # the driver's start failed after this worker began: stop with it
        torch.distributed.destroy_process_group()
        return
    cache_config, max_model_len, backend_name = setup
    if backend_name == "cpu" and not cpu_ops.load():
        backend_name = "torch"
    runner = ModelRunner(
        model.eval(), rank_model_config(model_config, world_size), cache_config, max_model_len,
        device, dtype, get_attention_backend(backend_name), tp=tp,
        quantization=config.quantization,
    )
    runner.start_weight_mover()  # rank 0 defers its own until the first step is out
    with torch.inference_mode():
        while (inputs := tp.broadcast()) is not None:
            runner.forward(inputs)
    torch.distributed.destroy_process_group()
