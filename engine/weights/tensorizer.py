"""Tensorizer artifacts: `model.tensors` plus config, tokenizer and manifest files, in a local
folder or under an `s3://` prefix.

Weights stream from S3 (or the disk) through tensorizer's concurrent readers straight into the
target device, in the target dtype, into a model built on the meta device: no pickle, no second
copy. The small files next to them are fetched with boto3.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.weights.prefetch import WEIGHTS_FILE
from engine.weights.s3 import S3Location, download_files, object_size, s3_client
from engine.weights.s3_reader import S3ObjectReader
from engine.weights.safetensors import load_folder_tokenizer, read_json
from engine.weights.source import (
    ConfigMismatchError,
    LoadProgress,
    WeightsError,
    WeightSource,
)

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SIDE_FILES = (
    "config.json", "generation_config.json", MANIFEST_FILE, "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model",
)
NUM_READERS = 4


class CorruptWeightsError(WeightsError):
    """The weights file is truncated or does not match its hashes."""


class TensorizerSource(WeightSource):
    def __init__(self, uri: str, s3_endpoint: str | None = None, verify_hash: bool = True,
                 early_reader: S3ObjectReader | None = None):
        self.uri = uri.rstrip("/")
        self.early_reader = early_reader  # the weights, already being read (`prefetch_weights`)
        self.s3_endpoint = s3_endpoint
        self.verify_hash = verify_hash
        self.is_s3 = uri.startswith("s3://")
        self._local_dir: Path | None = None if self.is_s3 else Path(uri)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._client: Any = None
        self._weights_bytes: int | None = None

    # -- the small files ------------------------------------------------------------------------

    def _files_dir(self) -> Path:
        """A local folder with config, tokenizer and manifest (downloaded once for S3)."""
        if self._local_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="model-")
            location = S3Location.parse(self.uri)
            self._client = s3_client(self.s3_endpoint)
            self._weights_bytes = (self.early_reader.size if self.early_reader is not None
                                   else object_size(self._client, location, WEIGHTS_FILE))
            download_files(self._client, location, list(SIDE_FILES), Path(self._tmp.name),
                           required=("config.json",))
            self._local_dir = Path(self._tmp.name)
        return self._local_dir

    def total_bytes(self) -> int:
        if self.is_s3:
            self._files_dir()
            return self._weights_bytes or 0
        path = Path(self.uri) / WEIGHTS_FILE
        return path.stat().st_size if path.exists() else 0

    def hf_config(self) -> dict[str, Any]:
        return read_json(self._files_dir() / "config.json")

    def generation_config(self) -> dict[str, Any]:
        path = self._files_dir() / "generation_config.json"
        return read_json(path) if path.exists() else {}

    def manifest(self) -> dict[str, Any]:
        path = self._files_dir() / MANIFEST_FILE
        return read_json(path) if path.exists() else {}

    def load_tokenizer(self) -> Any | None:
        return load_folder_tokenizer(self._files_dir())

    # -- the weights ----------------------------------------------------------------------------

    def _open_weights(self) -> tuple[Any, int, int]:
        """The weights as a file, its size, and how many tensorizer readers to use on it."""
        if not self.is_s3:
            path = self._files_dir() / WEIGHTS_FILE
            if not path.exists():
                raise WeightsError(f"{self.uri}: no {WEIGHTS_FILE}")
            file = open(path, "rb")  # noqa: SIM115 - closed by the caller
            return file, path.stat().st_size, NUM_READERS
        self._files_dir()
        size = self._weights_bytes or 0
        if self.early_reader is not None:
            return self.early_reader, size, 1
        # boto3 signs each ranged GET (temporary credentials included) and several are in
        # flight at once: one tensorizer reader consumes them in order.
        reader = S3ObjectReader(self._client, S3Location.parse(self.uri), WEIGHTS_FILE, size)
        return reader, size, 1

    def load_model(
        self, model_cls: type[nn.Module], config: Any, device: torch.device, dtype: torch.dtype,
        progress: LoadProgress,
    ) -> nn.Module:
        from tensorizer import TensorDeserializer
        from tensorizer.serialization import HashMismatchError

        stream, total_bytes, num_readers = self._open_weights()
        self._check_size(total_bytes)
        with torch.device("meta"):
            model = model_cls(config)
        try:
            deserializer = TensorDeserializer(
                stream, device=device, dtype=dtype, lazy_load=True,
                num_readers=num_readers, verify_hash=self.verify_hash,
            )
            with deserializer:
                self._place_tensors(model, deserializer, progress)
        except WeightsError:
            raise
        except HashMismatchError as e:
            raise CorruptWeightsError(
                f"{self.uri}/{WEIGHTS_FILE}: checksum mismatch, the file is corrupted ({e})"
            ) from e
        except Exception as e:  # noqa: BLE001 - tensorizer's many read errors, one meaning
            cause = e.__cause__ or e.__context__
            if isinstance(cause, WeightsError):  # a read error of ours, raised in a reader
                raise cause from e
            raise CorruptWeightsError(
                f"{self.uri}/{WEIGHTS_FILE}: unreadable ({type(e).__name__}: {e})"
            ) from e
        finally:
            stream.close()
        return model

    def _check_size(self, total_bytes: int) -> None:
        expected = self.manifest().get("weights_bytes")
        if expected is not None and expected != total_bytes:
            raise CorruptWeightsError(
                f"{self.uri}/{WEIGHTS_FILE}: {total_bytes} bytes, the manifest says {expected} "
                "(truncated or replaced)"
            )

    def _place_tensors(self, model: nn.Module, deserializer: Any, progress: LoadProgress) -> None:
        expected = dict(model.named_parameters())
        names = set(deserializer.keys())
        missing = sorted(set(expected) - names)
        if missing:
            raise ConfigMismatchError(f"{self.uri}: no weights for {', '.join(missing[:5])}")
        for name, tensor in deserializer.items():
            if name not in expected:
                raise ConfigMismatchError(f"{self.uri}: weight {name!r} has no place in the model")
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ConfigMismatchError(
                    f"{self.uri}: weight {name!r} has shape {tuple(tensor.shape)}, the config "
                    f"expects {tuple(expected[name].shape)}"
                )
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
            progress.set_loaded(deserializer.total_bytes_read)


def write_manifest(folder: Path, info: dict[str, Any]) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
