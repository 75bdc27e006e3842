"""Tensorizer artifacts: `model.tensors` plus config, tokenizer and manifest files, in a local
folder or under an `s3://` prefix. An artifact made for N tensor-parallel ranks holds one
`model-rank-RRR.tensors` per rank instead, and each rank reads only its own.

Weights stream from S3 (or the disk) through tensorizer's readers straight into the target
device, in the target dtype, into a model built on the meta device: no pickle, no second copy.
A CPU load from S3 goes further: the bytes land in the read's own memory and each weight is a
view of its bytes there, located by tensorizer's index. The small files next to them are
fetched with boto3.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.distributed.sharding import shard_model
from engine.distributed.tensor_parallel import SINGLE, TensorParallel
from engine.tokenizer import Tokenizer
from engine.weights import tensor_index
from engine.weights.digest import ALGORITHM
from engine.weights.prefetch import (
    MANIFEST_FILE,
    SIDE_FILES,
    WEIGHTS_FILE,
    FetchedRead,
    LocalRead,
)
from engine.weights.s3 import S3Location, download_files, object_size, s3_client
from engine.weights.s3_reader import ArrivingObject, S3ObjectReader
from engine.weights.safetensors import load_folder_tokenizer, read_json
from engine.weights.source import (
    ConfigMismatchError,
    LoadProgress,
    WeightsError,
    WeightSource,
)
from engine.weights.tensor_index import INDEX_KEY, index_end

logger = logging.getLogger(__name__)

NUM_READERS = 4


def rank_weights_file(rank: int) -> str:
    """One rank's weights in an artifact made for tensor parallelism (vLLM's naming)."""
    return f"model-rank-{rank:03d}.tensors"


class CorruptWeightsError(WeightsError):
    """The weights file is truncated or does not match its hashes."""


class TensorizerSource(WeightSource):
    def __init__(self, uri: str, s3_endpoint: str | None = None, verify_hash: bool = True,
                 early_read: LocalRead | FetchedRead | None = None):
        self.uri = uri.rstrip("/")
        self.early_read = early_read  # weights and side files, already coming (`prefetch.py`)
        self.s3_endpoint = s3_endpoint
        self.verify_hash = verify_hash
        self.is_s3 = uri.startswith("s3://")
        self._local_dir: Path | None = None if self.is_s3 else Path(uri)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._client: Any = None
        self._weights_bytes: int | None = None
        self._manifest: dict[str, Any] | None = None
        self.tp = SINGLE  # the engine's rank (rank 0, the driver, until told otherwise)

    def use_rank(self, tp: TensorParallel) -> None:
        self.tp = tp

    def num_artifact_ranks(self) -> int:
        """How many ranks the artifact was cut for (1: whole, every rank cuts its share)."""
        return int(self.manifest().get("tensor_parallel_size", 1))

    @property
    def weights_file(self) -> str:
        if self.num_artifact_ranks() > 1:
            return rank_weights_file(self.tp.rank)
        return WEIGHTS_FILE

    # -- the small files ------------------------------------------------------------------------

    def _files_dir(self) -> Path:
        """A local folder with config, tokenizer and manifest (downloaded once for S3)."""
        if self._local_dir is None:
            self._tmp = self.early_read.take_files() if self.early_read is not None else None
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="model-")
                download_files(self._s3(), S3Location.parse(self.uri), list(SIDE_FILES),
                               Path(self._tmp.name), required=("config.json",))
            self._local_dir = Path(self._tmp.name)
        return self._local_dir

    def _s3(self) -> Any:
        """This source's boto3 client, made when first needed (not at all when the early read
        brought everything: ~0.2 s of a cold start)."""
        if self._client is None:
            early_client = self.early_read.client if self.early_read is not None else None
            self._client = early_client or s3_client(self.s3_endpoint)
        return self._client

    def _early_reader(self) -> ArrivingObject | None:
        """The prefetched weights, if they are this rank's (prefetch reads `model.tensors`)."""
        if self.early_read is None:
            return None
        reader = self.early_read.reader() if self.weights_file == WEIGHTS_FILE else None
        if reader is None:
            self.early_read.close()
            self.early_read = None
        return reader

    def _s3_weights_bytes(self) -> int:
        if self._weights_bytes is None:
            self._files_dir()
            early = self._early_reader()
            self._weights_bytes = early.size if early is not None else object_size(
                self._s3(), S3Location.parse(self.uri), self.weights_file)
        return self._weights_bytes

    def total_bytes(self) -> int:
        if self.is_s3:
            return self._s3_weights_bytes()
        path = Path(self.uri) / self.weights_file
        return path.stat().st_size if path.exists() else 0

    def hf_config(self) -> dict[str, Any]:
        return read_json(self._files_dir() / "config.json")

    def generation_config(self) -> dict[str, Any]:
        path = self._files_dir() / "generation_config.json"
        return read_json(path) if path.exists() else {}

    def manifest(self) -> dict[str, Any]:
        """Read once: a load asks for it ~8 times, and each file read lets go of the GIL and
        waits up to a switch interval (5 ms) to get it back from the tokenizer's thread."""
        if self._manifest is None:
            path = self._files_dir() / MANIFEST_FILE
            self._manifest = read_json(path) if path.exists() else {}
        return self._manifest

    def load_tokenizer(self) -> Any | None:
        return load_folder_tokenizer(self._files_dir())

    def tokenizer(self) -> Tokenizer | None:
        """From the facts `tensorize` wrote, transformers' tokenizer loaded when first needed
        (the closure keeps this source, and its downloaded folder, alive until then)."""
        tokenizer = Tokenizer.from_folder_facts(self._files_dir(), self.load_tokenizer)
        return tokenizer if tokenizer is not None else super().tokenizer()

    # -- the weights ----------------------------------------------------------------------------

    def _open_weights(self, device: torch.device) -> tuple[Any, int, int]:
        """The weights as a file, its size, and how many tensorizer readers to use on it."""
        if not self.is_s3:
            path = self._files_dir() / self.weights_file
            if not path.exists():
                raise WeightsError(f"{self.uri}: no {self.weights_file}")
            file = open(path, "rb")  # noqa: SIM115 - closed by the caller
            return file, path.stat().st_size, NUM_READERS
        size = self._s3_weights_bytes()
        early = self._early_reader()
        if early is not None:
            self.early_read = None  # the read is the deserializer's now, which closes it
            return early, size, 1
        # boto3 signs each ranged GET (temporary credentials included) and several are in
        # flight at once: one tensorizer reader consumes them in order.
        return self._new_reader(in_memory=device.type == "cpu"), size, 1

    def load_model(
        self, model_cls: type[nn.Module], config: Any, device: torch.device, dtype: torch.dtype,
        progress: LoadProgress,
    ) -> nn.Module:
        num_ranks = self.num_artifact_ranks()
        if num_ranks > 1 and num_ranks != self.tp.world_size:
            raise ConfigMismatchError(
                f"{self.uri}: the artifact was cut for {num_ranks} tensor-parallel ranks, this "
                f"server runs {self.tp.world_size} (tensorize it again, or give the whole model)")
        stream, total_bytes, num_readers = self._open_weights(torch.device(device))
        self._check_size(total_bytes)
        with torch.device("meta"):
            model = model_cls(config)
            if num_ranks > 1:
                shard_model(model, self.tp)  # the shapes of this rank's tensors
        expected = self._expected_digest() if self.verify_hash else None
        # From S3, the manifest's digest of the whole object, hashed as the bytes come
        # (`S3ObjectReader.hash_object`); else (a file, or an artifact whose manifest predates
        # the digest) tensorizer's per-tensor checksums.
        digest = None
        if expected is not None and isinstance(stream, ArrivingObject):
            digest = stream.digest or stream.hash_object()
        # Views skip tensorizer's reads, and with them its per-tensor checksums.
        is_checked_elsewhere = digest is not None or not self.verify_hash
        index = self.manifest().get(INDEX_KEY) if num_ranks == 1 else None
        if is_checked_elsewhere and index is not None and self._can_view(stream):
            try:
                self._place_indexed_views(model, index, stream, device, dtype, progress)
                if digest is not None:
                    stream.read_to_end()  # past the last tensor too: all of it hashed
                    self._check_digest(digest.hexdigest(), expected)
            finally:
                stream.close()
            return model
        return self._load_with_tensorizer(model, stream, num_readers, device, dtype, progress,
                                          digest, expected)

    def _load_with_tensorizer(
        self, model: nn.Module, stream: Any, num_readers: int, device: torch.device,
        dtype: torch.dtype, progress: LoadProgress, digest: Any, expected: str | None,
    ) -> nn.Module:
        from tensorizer import TensorDeserializer
        from tensorizer.serialization import HashMismatchError

        try:
            deserializer = TensorDeserializer(
                stream, device=device, dtype=dtype, lazy_load=True, num_readers=num_readers,
                verify_hash=self.verify_hash and digest is None,
            )
            with deserializer:  # which closes the stream
                is_checked_elsewhere = digest is not None or not self.verify_hash
                if is_checked_elsewhere and self._can_view(stream, deserializer):
                    self._place_views(model, deserializer, stream, device, dtype, progress)
                else:
                    self._place_tensors(model, deserializer, progress)
                if digest is not None:
                    stream.read_to_end()  # past the last tensor too: all of it hashed
                    self._check_digest(digest.hexdigest(), expected)
        except WeightsError:
            raise
        except HashMismatchError as e:
            raise CorruptWeightsError(
                f"{self.uri}/{self.weights_file}: checksum mismatch, the file is corrupted ({e})"
            ) from e
        except Exception as e:  # noqa: BLE001 - tensorizer's many read errors, one meaning
            cause = e.__cause__ or e.__context__
            if isinstance(cause, WeightsError):  # a read error of ours, raised in a reader
                raise cause from e
            raise CorruptWeightsError(
                f"{self.uri}/{self.weights_file}: unreadable ({type(e).__name__}: {e})"
            ) from e
        finally:
            stream.close()
        return model

    def _expected_digest(self) -> str | None:
        manifest = self.manifest()
        if self.num_artifact_ranks() > 1:
            digests = manifest.get(f"rank_weights_{ALGORITHM}", [None] * self.tp.world_size)
            return digests[self.tp.rank]
        return manifest.get(f"weights_{ALGORITHM}")

    def _check_digest(self, actual: str | None, expected: str) -> None:
        if actual is None:  # read out of order (never, as tensorizer reads): hash it again
            logger.warning("%s/%s: read out of order; hashing it again", self.uri,
                           self.weights_file)
            with self._new_reader() as reader:
                digest = reader.hash_object()
                reader.read_to_end()
                actual = digest.hexdigest()
        if actual != expected:
            detail = self._corrupt_tensor() or (
                f"its {ALGORITHM} is {actual}, the manifest says {expected}")
            raise CorruptWeightsError(
                f"{self.uri}/{self.weights_file}: checksum mismatch, the file is corrupted "
                f"({detail})")

    def _corrupt_tensor(self) -> str | None:
        """Which tensor's own checksum fails, by tensorizer's (read again: only once the whole
        object's digest has failed), or None if none does (the bytes between tensors)."""
        from tensorizer import TensorDeserializer
        from tensorizer.serialization import HashMismatchError

        try:
            with TensorDeserializer(self._new_reader(), device="cpu", lazy_load=True,
                                    num_readers=1, verify_hash=True) as deserializer:
                for _ in deserializer.values():
                    pass
        except HashMismatchError as e:
            return str(e)
        return None

    def _new_reader(self, in_memory: bool = False) -> S3ObjectReader:
        return S3ObjectReader(self._s3(), S3Location.parse(self.uri), self.weights_file,
                              self._s3_weights_bytes(), in_memory=in_memory)

    def _check_size(self, total_bytes: int) -> None:
        manifest = self.manifest()
        expected = manifest.get("weights_bytes")
        if self.num_artifact_ranks() > 1:
            expected = manifest["rank_weights_bytes"][self.tp.rank]
        if expected is not None and expected != total_bytes:
            raise CorruptWeightsError(
                f"{self.uri}/{self.weights_file}: {total_bytes} bytes, the manifest says "
                f"{expected} (truncated or replaced)"
            )

    def _check_names(self, model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every parameter of the model has its weight, of its shape, and nothing else comes."""
        expected = dict(model.named_parameters())
        missing = sorted(set(expected) - set(shapes))
        if missing:
            raise ConfigMismatchError(f"{self.uri}: no weights for {', '.join(missing[:5])}")
        for name, shape in shapes.items():
            if name not in expected:
                raise ConfigMismatchError(f"{self.uri}: weight {name!r} has no place in the model")
            if tuple(shape) != tuple(expected[name].shape):
                raise ConfigMismatchError(
                    f"{self.uri}: weight {name!r} has shape {tuple(shape)}, the config "
                    f"expects {tuple(expected[name].shape)}"
                )

    @staticmethod
    def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)

    def _place_tensors(self, model: nn.Module, deserializer: Any, progress: LoadProgress) -> None:
        self._check_names(model, {name: entry.shape for name, entry in _entries(deserializer)})
        for name, tensor in deserializer.items():
            self._set_parameter(model, name, tensor)
            progress.set_loaded(deserializer.total_bytes_read)

    @staticmethod
    def _can_view(stream: Any, deserializer: Any = None) -> bool:
        """Whether the weights can be views of the read's memory: an S3 read `in_memory`, and
        (if tensorizer reads the index) each tensor's bytes stored whole (not encrypted, not a
        meta tensor without data)."""
        return (isinstance(stream, ArrivingObject) and stream.memory is not None
                and (deserializer is None or not deserializer._encrypted and all(
                    entry.data_length == entry.deserialized_length
                    for _, entry in _entries(deserializer))))

    def _place_indexed_views(self, model: nn.Module, index: dict[str, list[Any]],
                             stream: ArrivingObject, device: torch.device,
                             dtype: torch.dtype, progress: LoadProgress) -> None:
        """`_place_views` by the manifest's index: no tensorizer import."""
        if index_end(index) > stream.size:
            raise CorruptWeightsError(
                f"{self.uri}/{self.weights_file}: the manifest's index reaches byte "
                f"{index_end(index)}, the file has {stream.size} (truncated or replaced)")
        entries = sorted(index.items(), key=lambda item: item[1][2])  # by offset
        self._check_names(model, {name: tuple(entry[1]) for name, entry in entries})
        for name, entry in entries:
            end = entry[2] + entry[3]
            try:
                tensor = tensor_index.view(stream.arrived(end), entry)
            except (ValueError, TypeError, AttributeError) as e:  # an index that lies
                raise CorruptWeightsError(
                    f"{self.uri}/{self.weights_file}: the manifest's index of {name!r} does "
                    f"not fit ({e})") from e
            self._set_parameter(model, name, tensor.to(device=device, dtype=dtype))
            progress.set_loaded(end)

    def _place_views(self, model: nn.Module, deserializer: Any,
                     stream: ArrivingObject,
                     device: torch.device, dtype: torch.dtype, progress: LoadProgress) -> None:
        """Each weight made over its bytes in the read's memory as soon as they have arrived,
        in the object's order: no copy (on the CPU, in the dtype stored), no tensorizer read.
        The object's own digest (`hash_object`) is what checks those bytes."""
        from tensorizer._NumpyTensor import _NumpyTensor
        from tensorizer.serialization import OPAQUE_DTYPE_SEP

        entries = sorted(_entries(deserializer), key=lambda item: item[1].data_offset)
        self._check_names(model, {name: entry.shape for name, entry in entries})
        for name, entry in entries:
            end = entry.data_offset + entry.data_length
            numpy_dtype, _, torch_dtype = entry.dtype.partition(OPAQUE_DTYPE_SEP)
            tensor = _NumpyTensor.from_buffer(
                numpy_dtype, torch_dtype or None, entry.shape,
                stream.arrived(end)[entry.data_offset : end]).to_tensor()
            self._set_parameter(model, name, tensor.to(device=device, dtype=dtype))
            progress.set_loaded(end)


def _entries(deserializer: Any) -> list[tuple[str, Any]]:
    """The file's index: (name, entry with dtype, shape, data offset and length) per tensor."""
    return [(path.normalize_(), entry) for path, entry in deserializer._metadata.items()]


def write_manifest(folder: Path, info: dict[str, Any]) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
