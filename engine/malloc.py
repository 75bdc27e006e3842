"""Freed memory handed back to the OS.

glibc keeps freed blocks in its heaps for reuse: below its mmap threshold, which rises to 32 MiB
as large blocks are freed. The load's replaced copies of the weights (the loaded ones, once
quantized, packed and moved into huge pages) are freed into those heaps and stay resident:
~0.9 GB for SmolLM2 in bf16+int8, ~0.2 GB in fp32. `malloc_trim` returns the free pages;
elsewhere (another libc) it is not there and nothing happens.
"""

from __future__ import annotations

import ctypes


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc); a no-op where there is no such call."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim(0)
