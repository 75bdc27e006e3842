"""The C++ CPU kernels (`engine/kernels/cpu/*.cpp`): built once per machine type, then loaded.

The library is compiled with the instruction set torch itself dispatches to on this CPU
(`torch.backends.cpu.get_cpu_capability()`), never `-march=native`, so a build made on one machine
(the image's) runs on any machine of the same capability. It lives in torch's extension folder
(`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`) under a name that carries the
capability and a hash of the sources and flags: a changed kernel or torch is a new build, a cached
one is loaded in ~10 ms without a compiler. Building needs a C++ compiler and takes ~35 s on two
cores; without one, `load()` returns False and the torch references stay the CPU path.

A server builds in a process of its own, in a session of its own, that takes its compilers down
with it when the server's process ends, however it ends: left to themselves, a stopped server's
ninja and g++ ran on to the end of each file, beside the next start's build of the same library.

    python -m engine.kernels.cpu_ops     # build for this machine (the Dockerfile builds them all)
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import signal
import subprocess
import sys
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


def library_path(cap: str) -> Path:
    """Where the library for `cap` is (or will be) built."""
    name = library_name(cap)
    return extensions_root() / name / f"{name}.so"


def extensions_root() -> Path:
    """Where torch's cpp_extension builds: $TORCH_EXTENSIONS_DIR, else
    ~/.cache/torch_extensions/py311_cpu (torch 2.13's `_get_build_directory`, as a test checks).
    Not asked of cpp_extension itself: importing it imports setuptools, 0.2 s holding the GIL
    while a cold start's first request runs."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return Path(root)
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    from torch import _appdirs  # the module itself is light (no setuptools)

    cache = os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions"))
    return Path(cache) / f"{python}_{accelerator}"


def build(cap: str) -> Path:
    """The library for `cap`, compiled first (once) by a child process that does not outlive
    this one; its path."""
    library = library_path(cap)
    if library.exists():  # read-only folders (the image's) are fine once built
        return library
    command = [sys.executable, "-m", "engine.kernels.cpu_ops", "--child-of", str(os.getpid()), cap]
    result = subprocess.run(command, capture_output=True, text=True, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[2], check=False)
    if result.returncode != 0 or not library.exists():
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"the build for {cap} failed: {lines[-1] if lines else 'no output'}")
    return library


def build_here(cap: str) -> Path:
    """Compile the library for `cap` in this process (once); its path."""
    from torch.utils import cpp_extension

    library = library_path(cap)
    if library.exists():
        return library
    name, folder = library.stem, library.parent
    folder.mkdir(parents=True, exist_ok=True)
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


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` for [rows, n] logits: the C++ op where it serves (fp32 on the CPU; a
    32-sequence step's [32, 49152] 1.1 -> ~0.1 ms), else torch's."""
    if serves(x) and x.dim() == 2 and x.dtype == torch.float32 and x.shape[1] > 0:
        return torch.ops.llm_cpu.argmax_rows(x)
    return x.argmax(dim=-1)


def _die_with(parent_pid: int) -> None:
    """In the build's child (a session leader): when `parent_pid` ends, the build ends too.
    Linux's parent-death signal; elsewhere the build runs to its end."""
    if os.getpgid(0) != os.getpid():  # not its own group's leader: its signal would reach others
        return

    def kill_group(*_: object) -> None:
        # SIGTERM to this process group: ninja, which runs each compiler in a group of its own
        # and passes the signal on to them before it exits.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(0, signal.SIGTERM)
        os._exit(1)

    signal.signal(signal.SIGTERM, kill_group)
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent ended before the signal was asked for
        kill_group()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    arguments = sys.argv[1:]
    if arguments[:1] == ["--child-of"]:
        _die_with(int(arguments[1]))
        arguments = arguments[2:]
    for cap in arguments or [capability()]:
        print(build_here(cap))
