"""The C++ CPU kernels (`engine/kernels/cpu/*.cpp`): built once per machine type, then loaded.

The library is compiled with the instruction set torch itself dispatches to on this CPU
(`torch.backends.cpu.get_cpu_capability()`), never `-march=native`, so a build made on one machine
(the image's) runs on any machine of the same capability. It lives in torch's extension folder
(`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`) under a name that carries the
capability and a hash of the sources and flags: a changed kernel or torch is a new build, a cached
one is loaded in ~10 ms without a compiler. Building needs a C++ compiler and takes ~20 s of one
core; without one, `load()` returns False and the torch references stay the CPU path.

    python -m engine.kernels.cpu_ops     # build for this machine (the Dockerfile builds them all)
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "cpu").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "cpu").glob("*.h"))
COMMON_FLAGS = ("-O3", "-ffast-math", "-fopenmp")
# ATen's vector types (at::vec::Vectorized) pick their width from the CPU_CAPABILITY macros.
CAPABILITY_FLAGS = {
    "DEFAULT": ("-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"),
    "AVX2": ("-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"),
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-mf16c", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"),
}

_lock = threading.Lock()
_is_loaded = False


def capability() -> str:
    found = torch.backends.cpu.get_cpu_capability()
    return found if found in CAPABILITY_FLAGS else "DEFAULT"


def library_name(cap: str) -> str:
    digest = hashlib.sha256(torch.__version__.encode())
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    digest.update(" ".join(COMMON_FLAGS + CAPABILITY_FLAGS[cap]).encode())
    return f"llm_cpu_{cap.lower()}_{digest.hexdigest()[:12]}"


def build(cap: str) -> Path:
    """Compile the library for `cap` into torch's extension folder (once); its path."""
    from torch.utils import cpp_extension

    name = library_name(cap)
    # $TORCH_EXTENSIONS_DIR/<name>, else ~/.cache/torch_extensions/py311_cpu/<name> (torch 2.13)
    folder = Path(cpp_extension._get_build_directory(name, verbose=False))
    library = folder / f"{name}.so"
    if library.exists():  # read-only folders (the image's) are fine once built
        return library
    with open(folder / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        if not library.exists():
            # The builder behind cpp_extension.load() without its loading step: a library built
            # for another capability must not be loaded here (torch 2.13's signature, pinned).
            cpp_extension._write_ninja_file_and_build_library(
                name, [str(s) for s in SOURCES], list(COMMON_FLAGS + CAPABILITY_FLAGS[cap]),
                None, None, ["-fopenmp"], None, str(folder), False, False, False,
            )
    return library


def load() -> bool:
    """Make `torch.ops.llm_cpu.*` available on this machine; False (logged) if it cannot be."""
    global _is_loaded
    with _lock:
        if _is_loaded:
            return True
        try:
            library = build(capability())
            if not hasattr(torch.ops.llm_cpu, "paged_decode_attention"):
                torch.ops.load_library(str(library))
        except Exception as e:  # noqa: BLE001 - no compiler, read-only cache: the references serve
            logger.warning("no C++ CPU kernels (%s: %s); the torch references serve",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return False
        _is_loaded = True
        return True


def is_loaded() -> bool:
    return _is_loaded


def serves(x: torch.Tensor) -> bool:
    """Whether the C++ kernels take `x`: a CPU tensor, the library loaded, and not while
    torch.compile traces (it fuses the torch references itself)."""
    return _is_loaded and x.device.type == "cpu" and not torch.compiler.is_compiling()


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    for cap in sys.argv[1:] or [capability()]:
        print(build(cap))
