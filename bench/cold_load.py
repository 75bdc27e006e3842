"""Cold load of SmolLM2-135M from a loopback S3 server (moto), by hand; results go in the README.

For bf16 and fp32: tensorizer straight into the engine's model (with and without checking the
checksums); transformers `from_pretrained`
from a local safetensors folder; boto3 download then safetensors load; and the raw read speed of
the same tensorizer object with parallel ranged GETs (the wire-speed limit here).

    .venv/bin/python bench/cold_load.py
"""

from __future__ import annotations

import concurrent.futures
import sys
import tempfile
import time
from pathlib import Path

import boto3
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ModelConfig  # noqa: E402
from engine.models import model_class  # noqa: E402
from engine.weights import LoadProgress  # noqa: E402
from engine.weights.tensorize import tensorize  # noqa: E402
from engine.weights.tensorizer import TensorizerSource  # noqa: E402
from tests.s3_server import s3_server  # noqa: E402

CHUNK = 16 << 20


def ranged_read(client, bucket: str, key: str, threads: int = 8) -> int:
    size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]

    def get(start: int) -> int:
        end = min(start + CHUNK, size) - 1
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end}")["Body"]
        return len(body.read())

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(get, range(0, size, CHUNK)))


def curl_ranged_read(client, bucket: str, key: str, processes: int = 8) -> int:
    """The read path tensorizer itself uses (curl on presigned URLs), in parallel ranges."""
    import subprocess

    size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key})
    part = -(-size // processes)
    running = [
        subprocess.Popen(["curl", "-sf", "-r", f"{start}-{min(start + part, size) - 1}", "-o",
                          "/dev/null", url])
        for start in range(0, size, part)
    ]
    if any(p.wait() != 0 for p in running):
        raise RuntimeError("curl failed")
    return size


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median_load(uri: str, endpoint: str, config: ModelConfig, dtype: torch.dtype,
                verify: bool) -> float:
    times = []
    for _ in range(3):
        source = TensorizerSource(uri, s3_endpoint=endpoint, verify_hash=verify)
        seconds, _ = timed(lambda s=source: s.load_model(
            model_class(config), config, torch.device("cpu"), dtype, LoadProgress()))
        times.append(seconds)
    return sorted(times)[1]


def hf_folder(dtype: torch.dtype, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.weights import default_model_path

    path = default_model_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      dtype=dtype)
    config = gguf_model.config
    del config.quantization_config  # a plain copy of the dequantized weights
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(folder, safe_serialization=True)
    # the tokenizer too, so that the folder serves (bench/cold_start.py starts a server on it)
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(folder)
    return folder


def main() -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    rows = []
    with s3_server() as endpoint, tempfile.TemporaryDirectory() as tmp:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
            uri = f"s3://bench/smollm2-{name}"
            manifest = tensorize("", uri, name, endpoint)
            size = manifest["weights_bytes"]
            source = TensorizerSource(uri, s3_endpoint=endpoint)
            config = ModelConfig.from_hf(source.hf_config())
            seconds, _ = timed(lambda s=source, c=config, d=dtype: s.load_model(
                model_class(c), c, torch.device("cpu"), d, LoadProgress()))
            rows.append((name, "tensorizer from S3 into the engine", seconds, size))
            for verify in (True, False):  # the cost of checksums: medians of 3, interleaved
                label = "checksums verified" if verify else "checksums not verified"
                seconds = median_load(uri, endpoint, config, dtype, verify)
                rows.append((name, f"tensorizer from S3, {label} (median of 3)", seconds, size))
            folder = hf_folder(dtype, Path(tmp) / f"hf-{name}")
            st_file = folder / "model.safetensors"
            seconds, _ = timed(lambda f=folder, d=dtype: AutoModelForCausalLM.from_pretrained(
                str(f), dtype=d))
            rows.append((name, "transformers from_pretrained (local)", seconds,
                         st_file.stat().st_size))
            client.upload_file(str(st_file), "bench", f"st-{name}/model.safetensors")
            target = Path(tmp) / f"download-{name}.safetensors"
            seconds, _ = timed(lambda n=name, t=target: (
                client.download_file("bench", f"st-{n}/model.safetensors", str(t)),
                load_file(str(t))))
            rows.append((name, "boto3 download + safetensors load", seconds,
                         st_file.stat().st_size))
            seconds, nbytes = timed(lambda n=name: ranged_read(
                client, "bench", f"smollm2-{n}/model.tensors"))
            rows.append((name, "raw parallel ranged GETs, boto3", seconds, nbytes))
            seconds, nbytes = timed(lambda n=name: curl_ranged_read(
                client, "bench", f"smollm2-{n}/model.tensors"))
            rows.append((name, "raw parallel ranged GETs, curl", seconds, nbytes))
    print(f"{'dtype':9s} {'path':40s} {'seconds':>8s} {'GB/s':>6s}")
    for dtype_name, path, seconds, nbytes in rows:
        print(f"{dtype_name:9s} {path:40s} {seconds:8.2f} {nbytes / seconds / 1e9:6.2f}")


if __name__ == "__main__":
    main()
