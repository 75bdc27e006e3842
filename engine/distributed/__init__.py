"""Tensor parallelism: one model split across processes (ranks), Megatron-style, as vLLM does.

`tensor_parallel.py` holds a rank's place in the group and its collectives, `sharding.py` cuts a
loaded model down to one rank's share, `worker.py` is the loop a non-driver rank runs. The
scheduler and block manager run once, on the driver (rank 0), which broadcasts each step's
inputs; the ranks all-reduce after o_proj and down_proj and gather the logits' vocabulary slices.
"""
