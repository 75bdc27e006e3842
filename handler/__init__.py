"""The SageMaker-style HTTP front of the engine."""

from __future__ import annotations

import functools


@functools.cache
def version() -> str:
    """This package's version, looked up when first asked: `importlib.metadata` scans every
    installed distribution (50-100 ms, before the server could answer its first /ping)."""
    from importlib import metadata

    try:
        return metadata.version("sagemaker-llm")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0.0.0"
