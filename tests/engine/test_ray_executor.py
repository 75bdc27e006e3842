"""The Ray executor on a local Ray cluster of two simulated nodes (`ray.cluster_utils.Cluster`,
one CPU each): the two ranks' bundles sit on the two nodes, rank 1 in its own, and greedy
tokens with 2 ranks equal transformers'."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.tiny_models import hf_greedy, random_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_ranks_on_two_nodes_match_transformers(two_node_cluster, tiny_llama_dir):
    import ray

    prompts = random_prompts(3, 1, 60, seed=31)
    expected = [hf_greedy(tiny_llama_dir, p, 8) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with LLM(tiny_llama_dir, tensor_parallel_size=2, distributed_executor_backend="ray",
             max_num_batched_tokens=32) as llm:
        [worker_node] = llm.engine.executor.node_ids()
        bundle_nodes = llm.engine.executor.bundle_node_ids()
        # One CPU per node: the two bundles sit on the two nodes, rank 1 in its bundle's.
        assert len(set(bundle_nodes)) == 2 and worker_node == bundle_nodes[1]
        assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    assert ray.util.list_named_actors() == []
