"""Attention kernels: Triton for the GPU, plain-torch references for the CPU and the tests."""
