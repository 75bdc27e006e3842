"""Ranks 1..N-1 as Ray actors (`--distributed-executor-backend ray`): on one node or many.

A placement group of N bundles (one CPU, or one GPU, each) reserves the ranks' resources; bundle
0 is the driver's, the engine's own process, and rank r runs in bundle r. The actors run the
same loop as the multiprocessing workers (`worker.run_worker`) and join the driver's group over
TCP at the driver's node address. Connects to a running cluster (`RAY_ADDRESS`, or one this
process already joined), else starts a local one and stops it with the engine.
"""

from __future__ import annotations

from engine.config import EngineConfig
from engine.distributed.tensor_parallel import TensorParallel, free_port


class RayExecutor:
    def __init__(self, config: EngineConfig):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.world_size = config.tensor_parallel_size
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            ray.init(ignore_reinit_error=True, log_to_driver=False)
        is_gpu = config.resolved_device.startswith("cuda")
        bundle = {"GPU": 1} if is_gpu else {"CPU": 1}
        host = ray.util.get_node_ip_address()
        # Bundle 0 is the driver's: pinned to its node (Ray's `node:IP` resource, as vLLM does).
        bundles = [{**bundle, f"node:{host}": 0.001}] + [bundle] * (self.world_size - 1)
        self.group = placement_group(bundles, strategy="PACK")
        ray.get(self.group.ready(), timeout=300)
        self.init_method = f"tcp://{host}:{free_port()}"
        # Two calls at once: `run` blocks for the life of the rank, `node_id` must still answer.
        worker_class = ray.remote(num_cpus=0 if is_gpu else 1, num_gpus=1 if is_gpu else 0,
                                  max_concurrency=2)(
            _RankActor)
        self.actors, self.runs = [], []
        for rank in range(1, self.world_size):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=rank)
            actor = worker_class.options(scheduling_strategy=strategy).remote()
            self.actors.append(actor)
            self.runs.append(actor.run.remote(config, rank, self.world_size, self.init_method))

    def bundle_node_ids(self) -> list[str]:
        """The Ray node id of each bundle, bundle 0 (the driver's) first."""
        from ray.util import placement_group_table

        nodes = placement_group_table(self.group)["bundles_to_node_id"]
        return [nodes[i] for i in range(self.world_size)]

    def node_ids(self) -> list[str]:
        """Each worker's Ray node id, in rank order (where placement put them)."""
        import ray

        return ray.get([actor.node_id.remote() for actor in self.actors], timeout=60)

    def dead_worker(self) -> str | None:
        import ray

        for rank, run in enumerate(self.runs, start=1):
            done, _ = ray.wait([run], timeout=0)
            if done:
                try:
                    ray.get(done[0])
                    reason = "returned"
                except Exception as e:  # noqa: BLE001 - the actor's death, as Ray reports it
                    reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                return f"tensor-parallel rank {rank} (Ray actor) exited: {reason}"
        return None

    def shutdown(self, tp: TensorParallel, timeout_s: float = 30.0) -> None:
        import ray
        import torch.distributed as dist
        from ray.util.placement_group import remove_placement_group

        try:
            if self.dead_worker() is None:
                tp.broadcast(None)
                ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout_s)
        finally:
            for actor in self.actors:
                ray.kill(actor)
            remove_placement_group(self.group)
            if dist.is_initialized():
                dist.destroy_process_group()
            if self.started_ray:
                ray.shutdown()


class _RankActor:
    """One rank's process: Ray starts it, `run` blocks in the worker loop until the end."""

    def run(self, config: EngineConfig, rank: int, world_size: int, init_method: str) -> None:
        from engine.distributed.worker import run_worker

        run_worker(config, rank, world_size, init_method)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()
