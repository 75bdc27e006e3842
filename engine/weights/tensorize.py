"""Turn a Hugging Face folder or a GGUF file into a tensorizer artifact, locally or on S3.

The artifact: `model.tensors` (this engine's module layout, in the chosen dtype), `config.json`,
`generation_config.json`, the tokenizer files (chat template included) and `manifest.json`
(dtype, parameter count, bytes, sha256 and XXH3-128 of the weights: the loader checks the
latter; tensorizer's index of the weights, engine/weights/tensor_index.py). With
`tensor_parallel_size` N > 1 the weights are cut for N ranks instead, one
`model-rank-RRR.tensors` each (vLLM's layout), so that each rank of a tensor-parallel server
reads only its share.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.distributed.sharding import check_divisible, shard_model
from engine.distributed.tensor_parallel import TensorParallel
from engine.models import model_class
from engine.tokenizer import write_facts
from engine.weights.digest import ALGORITHM, new_hash
from engine.weights.loader import open_source
from engine.weights.s3 import S3Location, s3_client, upload_folder
from engine.weights.safetensors import load_folder_tokenizer
from engine.weights.source import LoadProgress
from engine.weights.tensor_index import INDEX_KEY, build_index
from engine.weights.tensorizer import WEIGHTS_FILE, rank_weights_file, write_manifest

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


def hash_file(path: Path, chunk_size: int = 1 << 22) -> dict[str, str]:
    """The file's sha256 (for `sha256sum`) and the digest the loader checks, in one pass."""
    hashes = {"sha256": hashlib.sha256(), ALGORITHM: new_hash()}
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            for digest in hashes.values():
                digest.update(chunk)
    return {name: digest.hexdigest() for name, digest in hashes.items()}


def _write_weights(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    from tensorizer import TensorSerializer

    serializer = TensorSerializer(str(path))
    serializer.write_module(model, include_non_persistent_buffers=False)
    serializer.close()
    return {"bytes": path.stat().st_size, **hash_file(path)}


def _write_rank_weights(model: torch.nn.Module, folder: Path, num_ranks: int) -> dict[str, Any]:
    """One file per rank, each the model cut as that rank of `num_ranks` cuts it."""
    check_divisible(model.config, num_ranks)
    files = []
    for rank in range(num_ranks):
        share = copy.deepcopy(model)
        shard_model(share, TensorParallel(rank, num_ranks))
        files.append(_write_weights(share, folder / rank_weights_file(rank)))
        del share
    return {
        "tensor_parallel_size": num_ranks,
        "rank_weights_bytes": [f["bytes"] for f in files],
        "rank_weights_sha256": [f["sha256"] for f in files],
        f"rank_weights_{ALGORITHM}": [f[ALGORITHM] for f in files],
    }


def write_artifact(src: str, folder: Path, dtype: str,
                   tensor_parallel_size: int = 1) -> dict[str, Any]:
    """Write the whole artifact into a local folder; return its manifest."""
    import json

    source = open_source(src)
    hf_config = source.hf_config()
    model_config = ModelConfig.from_hf(hf_config)
    model = source.load_model(
        model_class(model_config), model_config, torch.device("cpu"), DTYPES[dtype],
        LoadProgress(),
    )
    folder.mkdir(parents=True, exist_ok=True)
    if tensor_parallel_size > 1:
        weights = _write_rank_weights(model, folder, tensor_parallel_size)
    else:
        written = _write_weights(model, folder / WEIGHTS_FILE)
        weights = {"weights_bytes": written["bytes"], "weights_sha256": written["sha256"],
                   f"weights_{ALGORITHM}": written[ALGORITHM]}
        index = build_index(folder / WEIGHTS_FILE, model)
        if index is not None:
            weights[INDEX_KEY] = index
    (folder / "config.json").write_text(json.dumps(_clean_config(hf_config, dtype), indent=2))
    generation = source.generation_config() or {
        k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tokenizer = source.load_tokenizer()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
        # What the engine needs of it, from the tokenizer transformers builds from the saved
        # files, so that a server encodes and decodes without importing transformers.
        write_facts(load_folder_tokenizer(folder), folder)
    manifest = {
        "format": "tensorizer",
        "source": str(src) or "embedded SmolLM2-135M-Instruct",
        "model_type": model_config.model_type,
        "dtype": dtype,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        **weights,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_manifest(folder, manifest)
    return manifest


def tensorize(src: str, dest: str, dtype: str = "float32", s3_endpoint: str | None = None,
              tensor_parallel_size: int = 1) -> dict[str, Any]:
    """Tensorize `src` (HF folder, .gguf, "" = embedded model) into `dest` (folder or s3://),
    whole or cut for `tensor_parallel_size` ranks."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if not dest.startswith("s3://"):
        return write_artifact(src, Path(dest), dtype, tensor_parallel_size)
    location = S3Location.parse(dest)
    with tempfile.TemporaryDirectory(prefix="tensorize-") as staging:
        manifest = write_artifact(src, Path(staging), dtype, tensor_parallel_size)
        upload_folder(s3_client(s3_endpoint), Path(staging), location)
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
