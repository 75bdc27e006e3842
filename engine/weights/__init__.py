"""Weights from every source behind one interface: `open_source(model)`."""

from engine.weights.loader import default_model_path, open_source
from engine.weights.source import ConfigMismatchError, LoadProgress, WeightsError, WeightSource

__all__ = [
    "ConfigMismatchError",
    "LoadProgress",
    "WeightSource",
    "WeightsError",
    "default_model_path",
    "open_source",
]
