"""A CPU load from S3 makes its weights over the read's own memory: the object's bytes land from
the socket in one mapping, and each weight is a view of its bytes there (no copy), equal to what
tensorizer's own reads give, in one range or several, with the object's digest checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash

from engine.config import ModelConfig
from engine.models import model_class
from engine.weights import s3_reader
from engine.weights.s3 import S3Location, s3_client
from engine.weights.s3_reader import S3ObjectReader
from engine.weights.source import LoadProgress
from engine.weights.tensorize import tensorize
from engine.weights.tensorizer import TensorizerSource

URI = "s3://models/tiny-views"


@pytest.fixture(scope="module")
def tiny_on_s3(tiny_llama_dir, s3, s3_endpoint) -> str:
    tensorize(tiny_llama_dir, URI, "float32", s3_endpoint)
    return URI


@pytest.fixture(params=[None, 64 << 10], ids=["one range", "ranges"])
def range_bytes(request, monkeypatch):
    monkeypatch.setattr(s3_reader, "RANGE_BYTES", request.param)
    return request.param


def _object(s3) -> bytes:
    return s3.get_object(Bucket="models", Key="tiny-views/model.tensors")["Body"].read()


def _load(uri: str, endpoint: str, in_memory: bool, dtype: torch.dtype, monkeypatch):
    """The model, and the readers the load made."""
    readers = []
    make_reader = TensorizerSource._new_reader

    def new_reader(self, in_memory: bool = False):
        readers.append(make_reader(self, in_memory=in_memory and is_in_memory))
        return readers[-1]

    is_in_memory = in_memory
    monkeypatch.setattr(TensorizerSource, "_new_reader", new_reader)
    source = TensorizerSource(uri, s3_endpoint=endpoint)
    config = ModelConfig.from_hf(source.hf_config())
    model = source.load_model(model_class(config), config, torch.device("cpu"), dtype,
                              LoadProgress())
    return model, readers


def test_in_memory_read_gives_the_object(tiny_on_s3, s3, s3_endpoint, range_bytes):
    body = _object(s3)
    reader = S3ObjectReader(s3_client(s3_endpoint), S3Location.parse(URI), "model.tensors",
                            len(body), in_memory=True)
    digest = reader.hash_object()
    try:
        assert reader.read(1000) == body[:1000]  # tensorizer's header reads
        assert bytes(reader.arrived(len(body))) == body
        assert reader.read() == body[1000:]
        assert digest.hexdigest() == xxhash.xxh3_128(body).hexdigest()
    finally:
        reader.close()


def test_cpu_weights_are_views_of_the_read(tiny_on_s3, s3_endpoint, range_bytes, monkeypatch):
    model, readers = _load(URI, s3_endpoint, True, torch.float32, monkeypatch)
    reference, _ = _load(URI, s3_endpoint, False, torch.float32, monkeypatch)
    memory = np.frombuffer(readers[0].memory, dtype=np.uint8)
    begin, end = memory.ctypes.data, memory.ctypes.data + memory.size
    expected = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert begin <= param.data_ptr() < end, name  # in the read's memory: no copy
        assert torch.equal(param, expected[name]), name
    assert readers[0].memory is not None and readers[1].memory is None


def test_another_dtype_is_converted_from_the_views(tiny_on_s3, s3_endpoint, monkeypatch):
    model, _ = _load(URI, s3_endpoint, True, torch.bfloat16, monkeypatch)
    reference, _ = _load(URI, s3_endpoint, False, torch.bfloat16, monkeypatch)
    expected = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16 and torch.equal(param, expected[name]), name
