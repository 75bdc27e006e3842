"""Shared fixtures. Triton's interpreter must be chosen before the first `@triton.jit` runs."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from engine import LLM, EngineConfig  # noqa: E402
from tests.handler.server import serve  # noqa: E402
from tests.tiny_models import (  # noqa: E402
    TINY_MODEL_KINDS,
    make_int4_exact_model,
    make_tiny_model,
)


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels() -> None:
    """Loaded (built if need be) before any engine starts, so every engine on the default CPU
    backend runs the C++ kernels from its first step, not from whenever a background load lands.
    Tests that want the references ask for attention_backend="torch"."""
    from engine.kernels import cpu_ops

    cpu_ops.load()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """A Hugging Face folder (safetensors, config, tokenizer) per tiny random architecture."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: make_tiny_model(kind, root / kind) for kind in TINY_MODEL_KINDS}


@pytest.fixture(scope="session")
def tiny_int4_exact_dir(tmp_path_factory) -> str:
    """A tiny Llama whose layers' fp32 weights are exactly 4-bit values (a dequantized GGUF's)."""
    return make_int4_exact_model("llama", tmp_path_factory.mktemp("tiny-int4-exact") / "llama")


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs) -> str:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    from tests.s3_server import s3_server

    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def s3(s3_endpoint):
    """A boto3 client of the loopback server, with the bucket "models" made."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="models")
    return client


@pytest.fixture(scope="session")
def tiny_server(tiny_llama_dir):
    with serve(EngineConfig(model=tiny_llama_dir), served_model_name="tiny") as server:
        yield server


@pytest.fixture(scope="session")
def tiny_offline(tiny_llama_dir):
    """The offline API on the same model: the reference for what the server returns."""
    return LLM(tiny_llama_dir)


@pytest.fixture(scope="session")
def expected_output(tiny_offline):
    """The greedy answer to `tests.prompts.PROMPT`: what every client must parse."""
    from engine import SamplingParams
    from tests.prompts import MAX_TOKENS, PROMPT

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return tiny_offline.generate([PROMPT], params)[0]


@pytest.fixture(scope="session")
def expected(expected_output) -> str:
    return expected_output.text
