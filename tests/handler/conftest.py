from __future__ import annotations

import pytest

from engine import LLM, EngineConfig
from tests.handler.server import serve


@pytest.fixture(scope="session")
def tiny_server(tiny_llama_dir):
    with serve(EngineConfig(model=tiny_llama_dir), served_model_name="tiny") as server:
        yield server


@pytest.fixture(scope="session")
def tiny_offline(tiny_llama_dir):
    """The offline API on the same model: the reference for what the server returns."""
    return LLM(tiny_llama_dir)
