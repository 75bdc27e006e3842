"""Tensorizer artifacts on a real S3 server on loopback: round trips that keep the greedy tokens,
and one clear error per fault, in bounded time."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash

from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.models import model_class
from engine.tokenizer import FACTS_FILE
from engine.weights import ConfigMismatchError, LoadProgress, WeightsError
from engine.weights.prefetch import prefetch_weights
from engine.weights.s3 import S3AccessDeniedError, S3NotFoundError, S3UnreachableError
from engine.weights.safetensors import load_folder_tokenizer
from engine.weights.tensor_index import INDEX_KEY
from engine.weights.tensorize import tensorize
from engine.weights.tensorizer import CorruptWeightsError, TensorizerSource
from tests.polling import eventually
from tests.s3_server import CREDENTIALS, set_auth_enforced
from tests.tiny_models import hf_greedy, random_prompts

PROMPTS = random_prompts(8, 1, 60, seed=21)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_on_s3(tiny_llama_dir, s3, s3_endpoint) -> str:
    manifest = tensorize(tiny_llama_dir, "s3://models/tiny-llama", "float32", s3_endpoint)
    assert manifest["weights_bytes"] > 0 and len(manifest["weights_sha256"]) == 64
    assert len(manifest["weights_xxh3_128"]) == 32
    return "s3://models/tiny-llama"


def _expected(folder):
    return [hf_greedy(folder, p, 10) for p in PROMPTS]


def test_s3_round_trip_keeps_greedy_tokens(tiny_llama_dir, tiny_on_s3, s3_endpoint):
    llm = LLM(tiny_on_s3, s3_endpoint=s3_endpoint)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == _expected(tiny_llama_dir)
    assert llm.engine.progress.loaded_bytes == llm.engine.progress.total_bytes > 0


def test_s3_artifact_tokenizes_without_transformers_until_a_chat(
        tiny_llama_dir, tiny_on_s3, s3_endpoint):
    """The artifact's tokenizer facts: prompts encode as transformers encodes them, with
    transformers' tokenizer loaded only for the first chat template."""
    llm = LLM(tiny_on_s3, s3_endpoint=s3_endpoint)
    reference = load_folder_tokenizer(Path(tiny_llama_dir))
    tokenizer = llm.engine.tokenizer
    assert not tokenizer.is_hf_loaded
    for text in ("Hello world! café 🙂", "<s>a</s>"):
        assert tokenizer.encode(text) == reference.encode(text)
    messages = [{"role": "user", "content": "hi 🙂"}]
    expected = reference.encode(reference.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    assert llm.engine.input_processor.chat_prompt_ids(messages) == expected
    assert tokenizer.is_hf_loaded


def test_local_tensorized_folder_keeps_greedy_tokens(tiny_llama_dir, tmp_path):
    tensorize(tiny_llama_dir, str(tmp_path / "art"), "float32")
    assert {"model.tensors", "config.json", "manifest.json", FACTS_FILE} <= {
        p.name for p in (tmp_path / "art").iterdir()
    }
    llm = LLM(str(tmp_path / "art"))
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == _expected(tiny_llama_dir)


def _copy_prefix(s3, src: str, dest: str, **overrides: bytes) -> str:
    for obj in s3.list_objects_v2(Bucket="models", Prefix=src + "/")["Contents"]:
        name = obj["Key"].split("/")[-1]
        body = s3.get_object(Bucket="models", Key=obj["Key"])["Body"].read()
        s3.put_object(Bucket="models", Key=f"{dest}/{name}", Body=overrides.get(name, body))
    return f"s3://models/{dest}"


def _load_error(uri: str, endpoint: str, **options) -> Exception:
    with pytest.raises(WeightsError) as info:
        LLM(uri, s3_endpoint=endpoint, **options)
    return info.value


def test_missing_bucket(s3, s3_endpoint):
    error = _load_error("s3://no-such-bucket/model", s3_endpoint)
    assert isinstance(error, S3NotFoundError) and "no-such-bucket" in str(error)


def test_missing_key(s3, s3_endpoint):
    error = _load_error("s3://models/not-there", s3_endpoint)
    assert isinstance(error, S3NotFoundError) and "s3://models/not-there" in str(error)


def test_unreachable_endpoint():
    error = _load_error("s3://models/tiny-llama", "http://127.0.0.1:9")
    assert isinstance(error, S3UnreachableError) and "unreachable" in str(error)


def test_access_denied(tiny_on_s3, s3_endpoint):
    set_auth_enforced(s3_endpoint, True)
    try:
        error = _load_error(tiny_on_s3, s3_endpoint)
    finally:
        set_auth_enforced(s3_endpoint, False)
    assert isinstance(error, S3AccessDeniedError) and "access denied" in str(error)


def test_truncated_weights(tiny_on_s3, s3, s3_endpoint):
    body = s3.get_object(Bucket="models", Key="tiny-llama/model.tensors")["Body"].read()
    uri = _copy_prefix(s3, "tiny-llama", "copy-1", **{"model.tensors": body[: len(body) // 2]})
    error = _load_error(uri, s3_endpoint)
    assert isinstance(error, CorruptWeightsError) and "truncated" in str(error)


@pytest.mark.parametrize("where", ["last tensor", "past the last tensor"])
def test_corrupted_weights_fail_hash_check(tiny_on_s3, s3, s3_endpoint, where):
    """The manifest's digest covers the whole object, the bytes after the last tensor too."""
    body = bytearray(s3.get_object(Bucket="models", Key="tiny-llama/model.tensors")["Body"].read())
    flipped = range(len(body) - 4096, len(body) - 4000) if where == "last tensor" else [-1]
    for i in flipped:
        body[i] ^= 0xFF
    dest = f"copy-2-{len(flipped)}"
    uri = _copy_prefix(s3, "tiny-llama", dest, **{"model.tensors": bytes(body)})
    error = _load_error(uri, s3_endpoint)  # verified by default
    assert isinstance(error, CorruptWeightsError) and "checksum mismatch" in str(error)
    assert f"s3://models/{dest}/model.tensors" in str(error)
    named = "lm_head.weight" if where == "last tensor" else "the manifest says"
    assert named in str(error)  # the tensor whose own checksum fails, if one does


def test_manifest_digests_are_those_of_the_object(tiny_on_s3, s3):
    body = s3.get_object(Bucket="models", Key="tiny-llama/model.tensors")["Body"].read()
    manifest = json.loads(
        s3.get_object(Bucket="models", Key="tiny-llama/manifest.json")["Body"].read())
    assert manifest["weights_sha256"] == hashlib.sha256(body).hexdigest()
    assert manifest["weights_xxh3_128"] == xxhash.xxh3_128(body).hexdigest()


@pytest.mark.parametrize("in_memory", [False, True])
def test_an_early_read_is_hashed_as_it_arrives(tiny_on_s3, s3_endpoint, in_memory):
    """The manifest's digest, computed while the bytes arrive, before anything reads them: on
    this process's threads, or (a CPU load, in memory) by the fetch process."""
    early = prefetch_weights(tiny_on_s3, s3_endpoint, in_memory=in_memory)
    try:
        reader = early.reader()
        assert eventually(lambda: reader.digest.num_bytes == reader.size, max_s=30)
        assert reader.tell() == 0
        manifest = TensorizerSource(tiny_on_s3, s3_endpoint=s3_endpoint).manifest()
        assert reader.digest.hexdigest() == manifest["weights_xxh3_128"]
    finally:
        early.close()


def test_weights_read_out_of_order_are_hashed_again(tiny_on_s3, s3_endpoint):
    source = TensorizerSource(tiny_on_s3, s3_endpoint=s3_endpoint)
    expected = source.manifest()["weights_xxh3_128"]
    source._check_digest(None, expected)  # hashed again from S3: no error
    with pytest.raises(CorruptWeightsError, match="checksum mismatch"):
        source._check_digest(None, "0" * 32)


@pytest.mark.parametrize("is_corrupted", [False, True])
def test_a_manifest_without_the_digest_is_checked_per_tensor(
        tiny_llama_dir, tiny_on_s3, s3, s3_endpoint, is_corrupted):
    """An artifact tensorized before the manifest carried XXH3-128 (sha256 only) is checked
    by tensorizer's own per-tensor hashes: it loads whole, and fails corrupted."""
    manifest = json.loads(
        s3.get_object(Bucket="models", Key="tiny-llama/manifest.json")["Body"].read())
    del manifest["weights_xxh3_128"]
    body = bytearray(s3.get_object(Bucket="models", Key="tiny-llama/model.tensors")["Body"].read())
    if is_corrupted:
        body[-4096] ^= 0xFF  # inside the last tensor
    uri = _copy_prefix(s3, "tiny-llama", f"old-manifest-{is_corrupted}", **{
        "manifest.json": json.dumps(manifest).encode(), "model.tensors": bytes(body)})
    if is_corrupted:
        error = _load_error(uri, s3_endpoint)
        assert isinstance(error, CorruptWeightsError) and "lm_head.weight" in str(error)
    else:
        llm = LLM(uri, s3_endpoint=s3_endpoint)
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == _expected(tiny_llama_dir)


def test_config_that_does_not_match_the_weights(tiny_on_s3, s3, s3_endpoint):
    config = json.loads(s3.get_object(Bucket="models", Key="tiny-llama/config.json")["Body"].read())
    config["intermediate_size"] *= 2
    uri = _copy_prefix(s3, "tiny-llama", "copy-3", **{"config.json": json.dumps(config).encode()})
    error = _load_error(uri, s3_endpoint)
    assert isinstance(error, ConfigMismatchError) and "intermediate" not in str(error)
    assert "gate_up_proj" in str(error)


def test_tensorize_command_line(tiny_llama_dir, tmp_path):
    import subprocess
    import sys

    dest = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "engine.weights", "tensorize", tiny_llama_dir, str(dest),
         "--dtype", "bfloat16"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["num_parameters"] > 0
    assert manifest["weights_bytes"] == (dest / "model.tensors").stat().st_size
    assert (dest / "tokenizer.json").exists()
    missing = subprocess.run(
        [sys.executable, "-m", "engine.weights", "tensorize", str(tmp_path / "nope"),
         str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "nope" in missing.stderr


def _loaded(uri: str, endpoint: str) -> dict[str, torch.Tensor]:
    source = TensorizerSource(uri, s3_endpoint=endpoint)
    config = ModelConfig.from_hf(source.hf_config())
    model = source.load_model(model_class(config), config, torch.device("cpu"), torch.float32,
                              LoadProgress())
    return dict(model.named_parameters())


def test_the_manifest_index_places_what_tensorizer_places(tiny_llama_dir, tiny_on_s3, s3,
                                                          s3_endpoint):
    """A CPU load views each weight where the manifest's index (written by `tensorize` from
    tensorizer's own) says; an artifact without the index (tensorized before) loads through
    tensorizer: the same weights, the same tokens."""
    manifest = json.loads(
        s3.get_object(Bucket="models", Key="tiny-llama/manifest.json")["Body"].read())
    by_index = _loaded(tiny_on_s3, s3_endpoint)
    assert set(manifest[INDEX_KEY]) == set(by_index)
    del manifest[INDEX_KEY]
    uri = _copy_prefix(s3, "tiny-llama", "no-index",
                       **{"manifest.json": json.dumps(manifest).encode()})
    by_tensorizer = _loaded(uri, s3_endpoint)
    assert by_index.keys() == by_tensorizer.keys()
    for name, weight in by_index.items():
        assert torch.equal(weight, by_tensorizer[name]), name
    llm = LLM(uri, s3_endpoint=s3_endpoint)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == _expected(tiny_llama_dir)


def test_a_load_by_the_index_imports_no_tensorizer(tiny_llama_dir, tiny_on_s3, s3_endpoint):
    """tensorizer's import (boto3, redis, psutil: ~0.3 s of a cold start) is not on a CPU
    load's path when the manifest has the index."""
    script = (
        "import sys; from engine import LLM, SamplingParams; "
        f"llm = LLM({tiny_on_s3!r}, s3_endpoint={s3_endpoint!r}); "
        "out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10)); "
        "print('tensorizer' in sys.modules, out[0].token_ids)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **CREDENTIALS})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split(maxsplit=1) == ["False", str(hf_greedy(tiny_llama_dir, [5, 6, 7],
                                                                     10)) + "\n"]


def test_an_index_that_does_not_fit_the_weights_is_named(tiny_on_s3, s3, s3_endpoint):
    manifest = json.loads(
        s3.get_object(Bucket="models", Key="tiny-llama/manifest.json")["Body"].read())
    entry = manifest[INDEX_KEY]["lm_head.weight"]
    entry[3] -= 4  # a length short of the shape
    uri = _copy_prefix(s3, "tiny-llama", "lying-index",
                       **{"manifest.json": json.dumps(manifest).encode()})
    error = _load_error(uri, s3_endpoint)
    assert isinstance(error, CorruptWeightsError) and "lm_head.weight" in str(error)
