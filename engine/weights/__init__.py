"""Weights from every source behind one interface: `open_source(model)`.

Names are imported on first use (PEP 562), so that the S3 reader can start before torch loads.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "ConfigMismatchError": "engine.weights.source",
    "LoadProgress": "engine.load_progress",
    "WeightSource": "engine.weights.source",
    "WeightsError": "engine.weights.errors",
    "default_model_path": "engine.weights.loader",
    "open_source": "engine.weights.loader",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'engine.weights' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
