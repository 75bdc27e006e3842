"""Turn a Hugging Face folder or a GGUF file into a tensorizer artifact, locally or on S3.

The artifact: `model.tensors` (this engine's module layout, in the chosen dtype), `config.json`,
`generation_config.json`, the tokenizer files (chat template included) and `manifest.json`
(dtype, parameter count, bytes, sha256 of the weights).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.models import model_class
from engine.weights.loader import open_source
from engine.weights.s3 import S3Location, s3_client, upload_folder
from engine.weights.source import LoadProgress
from engine.weights.tensorizer import WEIGHTS_FILE, write_manifest

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _clean_config(hf_config: dict[str, Any], dtype: str) -> dict[str, Any]:
    config = {k: v for k, v in hf_config.items() if k not in ("quantization_config",)}
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    config.setdefault("architectures", [_ARCHITECTURES.get(config.get("model_type"), "")])
    return config


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
}


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_artifact(src: str, folder: Path, dtype: str) -> dict[str, Any]:
    """Write the whole artifact into a local folder; return its manifest."""
    import json

    from tensorizer import TensorSerializer

    source = open_source(src)
    hf_config = source.hf_config()
    model_config = ModelConfig.from_hf(hf_config)
    model = source.load_model(
        model_class(model_config), model_config, torch.device("cpu"), DTYPES[dtype],
        LoadProgress(),
    )
    folder.mkdir(parents=True, exist_ok=True)
    serializer = TensorSerializer(str(folder / WEIGHTS_FILE))
    serializer.write_module(model, include_non_persistent_buffers=False)
    serializer.close()
    (folder / "config.json").write_text(json.dumps(_clean_config(hf_config, dtype), indent=2))
    generation = source.generation_config() or {
        k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tokenizer = source.load_tokenizer()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    manifest = {
        "format": "tensorizer",
        "source": str(src) or "embedded SmolLM2-135M-Instruct",
        "model_type": model_config.model_type,
        "dtype": dtype,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "weights_bytes": (folder / WEIGHTS_FILE).stat().st_size,
        "weights_sha256": sha256_file(folder / WEIGHTS_FILE),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_manifest(folder, manifest)
    return manifest


def tensorize(src: str, dest: str, dtype: str = "float32", s3_endpoint: str | None = None
              ) -> dict[str, Any]:
    """Tensorize `src` (HF folder, .gguf, "" = embedded model) into `dest` (folder or s3://)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    if not dest.startswith("s3://"):
        return write_artifact(src, Path(dest), dtype)
    location = S3Location.parse(dest)
    with tempfile.TemporaryDirectory(prefix="tensorize-") as staging:
        manifest = write_artifact(src, Path(staging), dtype)
        upload_folder(s3_client(s3_endpoint), Path(staging), location)
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
