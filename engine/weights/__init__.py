"""Weights from every source behind one interface: `open_source(model)`.

Names are imported on first use (PEP 562), so that the S3 reader can start before torch loads.
"""

from __future__ import annotations

from engine.lazy import lazy_names

_MODULE_OF = {
    "ConfigMismatchError": "engine.weights.source",
    "LoadProgress": "engine.load_progress",
    "WeightSource": "engine.weights.source",
    "WeightsError": "engine.weights.errors",
    "default_model_path": "engine.weights.loader",
    "open_source": "engine.weights.loader",
}

__all__ = sorted(_MODULE_OF)

__getattr__, __dir__ = lazy_names(__name__, _MODULE_OF)
