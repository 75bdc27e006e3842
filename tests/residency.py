"""Which pages of a tensor's memory the OS has mapped in (mincore), for the tests of memory that
costs nothing until touched."""

from __future__ import annotations

import ctypes
import mmap

import torch


def resident_pages(tensor: torch.Tensor) -> list[bool]:
    """One flag per 4 KiB page under `tensor`'s bytes: mapped in or not."""
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    num_pages = -(-(end - start) // page)
    flags = (ctypes.c_ubyte * num_pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(start, num_pages * page, flags) == 0, ctypes.get_errno()
    return [bool(f & 1) for f in flags]


def resident_bytes(tensor: torch.Tensor) -> int:
    """How many of `tensor`'s bytes are mapped in, by page."""
    return sum(resident_pages(tensor)) * mmap.PAGESIZE
