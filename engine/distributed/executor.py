"""Worker processes on this host for ranks 1..N-1 (`--distributed-executor-backend mp`).

The driver (rank 0) is the engine's own process. Workers are spawned (never forked: the parent
holds threads and, on a GPU, a CUDA context), join the group over loopback TCP, and exit when the
driver broadcasts None, or when the driver itself is gone.
"""

from __future__ import annotations

import multiprocessing

from engine.config import EngineConfig
from engine.distributed.tensor_parallel import TensorParallel, free_port
from engine.distributed.worker import run_worker


class MultiprocExecutor:
    def __init__(self, config: EngineConfig):
        self.world_size = config.tensor_parallel_size
        self.init_method = f"tcp://127.0.0.1:{free_port()}"
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(target=run_worker, name=f"tp-rank-{rank}", daemon=True,
                            args=(config, rank, self.world_size, self.init_method))
            for rank in range(1, self.world_size)
        ]
        for process in self.processes:
            process.start()

    def dead_worker(self) -> str | None:
        """'rank R exited with code C' for the first worker that is gone, else None."""
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                return f"tensor-parallel rank {rank} exited with code {process.exitcode}"
        return None

    def shutdown(self, tp: TensorParallel, timeout_s: float = 30.0) -> None:
        """Stop the workers' loops, then the group; any worker still there is killed."""
        import torch.distributed as dist

        try:
            if self.dead_worker() is None:
                tp.broadcast(None)
        finally:
            for process in self.processes:
                process.join(timeout_s)
                if process.is_alive():
                    process.kill()
                    process.join()
            if dist.is_initialized():
                dist.destroy_process_group()
