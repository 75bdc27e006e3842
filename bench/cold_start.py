"""Cold start from S3 against its limit, by hand (`make bench-cold-start`); results in the README.

A loopback S3 server (moto, its own process) holds the embedded SmolLM2 tensorized (fp32). The
limit, measured in the same run: the median `import torch` in a fresh process plus the median raw
read of the weights object (the faster of one GET and parallel ranged GETs). Then, several times
over, `python -m handler --model s3://...` is started cold, in both load modes (background, and
`--load-on-first-request`, the serverless one); from the process start it times the first /ping
answer, /ping 200, the first token of a `max_tokens: 1` request sent at once and retried on 503,
the phases /ping reports (imports, first weight byte, weights in place, KV cache ready) and the
slowest /ping answer during the load. Then (unless `--no-formats`) the same for other artifacts
loading in the background: the embedded GGUF and a local safetensors folder.

    .venv/bin/python bench/cold_start.py [--runs 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cold_load import CHUNK, ranged_read  # noqa: E402
from bench.serving import cpu_name, free_port  # noqa: E402
from engine.weights.tensorize import tensorize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUCKET, PREFIX = "models", "smollm2"
SAFETENSORS_DIR = Path.home() / ".cache/sagemaker-llm/bench/smollm2-st"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
               "AWS_DEFAULT_REGION": "us-east-1"}
PING_EVERY_S = 0.01


def _get(port: int, method: str, path: str, body: dict | None = None,
         timeout: float = 30.0) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = json.dumps(body) if body is not None else None
        conn.request(method, path, payload, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def start_s3() -> tuple[subprocess.Popen, str]:
    port = free_port()
    # moto's server, its ranged GETs made to cost their range (bench/s3_server.py says why)
    server = subprocess.Popen([sys.executable, str(ROOT / "bench/s3_server.py"), "-H",
                               "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(500):
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/")
            return server, endpoint
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("moto_server did not start")


def limit_seconds(client, runs: int) -> dict[str, float]:
    imports = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        imports.append(time.perf_counter() - start)
    key = f"{PREFIX}/model.tensors"
    single, ranged = [], []
    for _ in range(runs):
        start = time.perf_counter()
        client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        single.append(time.perf_counter() - start)
        start = time.perf_counter()
        ranged_read(client, BUCKET, key)
        ranged.append(time.perf_counter() - start)
    read = min(statistics.median(single), statistics.median(ranged))
    return {"import_torch": statistics.median(imports), "read_one_get": statistics.median(single),
            "read_ranged": statistics.median(ranged), "limit": statistics.median(imports) + read}


class PingWatch(threading.Thread):
    """Pings every 10 ms from the process start: first answer, first 200, slowest answer."""

    def __init__(self, port: int, started: float):
        super().__init__(daemon=True)
        self.port, self.started = port, started
        self.first_answer = self.first_ok = None
        self.slowest_s = 0.0
        self.slowest_at = 0.0  # when the slowest /ping was sent, from the process start
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            sent = time.time()
            try:
                status, _ = _get(self.port, "GET", "/ping", timeout=10)
            except OSError:
                time.sleep(PING_EVERY_S)
                continue
            now = time.time()
            if self.first_answer is None:
                self.first_answer = now - self.started
            elif now - sent > self.slowest_s:
                self.slowest_s, self.slowest_at = now - sent, sent - self.started
            if status == 200 and self.first_ok is None:
                self.first_ok = now - self.started
            time.sleep(PING_EVERY_S)


def cold_start(endpoint: str, lazy: bool, model: str = f"s3://{BUCKET}/{PREFIX}"
               ) -> dict[str, float]:
    port = free_port()
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL_S3": endpoint}
    command = [sys.executable, "-m", "handler", "--model", model, "--port", str(port),
               "--log-level", "warning"]
    started = time.time()
    server = subprocess.Popen(command + (["--load-on-first-request"] if lazy else []), env=env)
    watch = PingWatch(port, started)
    watch.start()
    try:
        first_token = _first_token(port, started)
        watch.stop.set()
        watch.join()
        _, status = _get(port, "GET", "/ping")  # the phases are kept once ready
        phases = {f"{name} at": at - started for name, at in status["phase_started_at"].items()}
        if status.get("first_byte_at"):
            phases["first byte at"] = status["first_byte_at"] - started
        return {"first /ping": watch.first_answer, "/ping 200": watch.first_ok,
                "first token": first_token, "slowest /ping": watch.slowest_s,
                "slowest /ping sent at": watch.slowest_at, **phases}
    finally:
        server.terminate()
        server.wait(30)


def _first_token(port: int, started: float) -> float:
    body = {"prompt": "Hello", "max_tokens": 1}
    while True:
        try:
            status, _ = _get(port, "POST", "/v1/completions", body, timeout=120)
        except OSError:
            time.sleep(PING_EVERY_S)
            continue
        if status == 200:
            return time.time() - started
        if status != 503:
            raise RuntimeError(f"the completion failed with {status}")
        time.sleep(PING_EVERY_S)


RUNAI_READ = """
import json, sys, time
start = time.time()
import torch  # noqa: F401 - its import is the peer's too
imported = time.time()
from runai_model_streamer import SafetensorsStreamer
from runai_model_streamer.s3_utils.s3_utils import S3Credentials
credentials = S3Credentials("x", "x", region_name="us-east-1", endpoint=sys.argv[2])
with SafetensorsStreamer() as streamer:
    is_s3 = sys.argv[1].startswith("s3://")
    streamer.stream_file(sys.argv[1], credentials if is_s3 else None, "cpu")
    num_bytes = sum(t.numel() * t.element_size() for _, t in streamer.get_tensors())
print(json.dumps({"import torch": imported - start, "read": time.time() - imported,
                  "bytes": num_bytes}))
"""


def safetensors_folder() -> Path:
    """The embedded model as an fp32 Hugging Face folder (weights, config, tokenizer), made once
    in a child process: this one stays as light as it was."""
    if not (SAFETENSORS_DIR / "tokenizer.json").exists():
        subprocess.run([sys.executable, "-c", "import sys, torch; from pathlib import Path; "
                        f"sys.path.insert(0, {str(ROOT)!r}); from bench.cold_load import "
                        f"hf_folder; hf_folder(torch.float32, Path({str(SAFETENSORS_DIR)!r}))"],
                       check=True, capture_output=True)
    return SAFETENSORS_DIR


def runai_peer(client, endpoint: str, runs: int) -> dict[str, float | str] | str:
    """The Run:ai Model Streamer (vLLM's `--load-format runai_streamer`) reading the same weights
    as safetensors from the same S3 server into CPU tensors, in a fresh process each time."""
    try:
        import runai_model_streamer  # noqa: F401
    except ImportError:
        return "not installed (pip install runai-model-streamer runai-model-streamer-s3)"
    # Its own defaults (what vLLM's `--load-format runai_streamer` gets), against an S3-compatible
    # endpoint as its docs say; the same file is read from the local disk too.
    env = {**os.environ, **CREDENTIALS, "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": endpoint,
           "RUNAI_STREAMER_LOG_LEVEL": "ERROR"}
    peer: dict[str, float | str] = {}
    path = safetensors_folder() / "model.safetensors"
    client.upload_file(str(path), BUCKET, "smollm2-st/model.safetensors")
    for where, source in (("s3", f"s3://{BUCKET}/smollm2-st/model.safetensors"),
                          ("file", str(path))):
        results = []
        for _ in range(runs):
            done = subprocess.run([sys.executable, "-c", RUNAI_READ, source, endpoint],
                                  env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                peer[where] = f"failed: {done.stderr.strip().splitlines()[-1]}"
                break
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if where in peer:
            continue
        for key in results[0]:
            peer[f"{where} {key}"] = statistics.median(r[key] for r in results)
    return peer


def other_formats(endpoint: str, runs: int) -> dict[str, list[dict[str, float]]]:
    """/ping while other artifacts load in the background, from the process start: the embedded
    GGUF (Q4_1, dequantized as it loads) and a local safetensors folder (fp32, made from the
    GGUF once)."""
    models = {"GGUF (embedded)": "default", "safetensors folder": str(safetensors_folder())}
    return {name: [cold_start(endpoint, lazy=False, model=model) for _ in range(runs)]
            for name, model in models.items()}


def print_runs(title: str, runs: list[dict[str, float]], limit: float) -> None:
    print(f"\n## {title} (median of {len(runs)}, seconds from process start)")
    print("| step | s | / limit |\n|---|---|---|")
    for key in runs[0]:
        values = [r[key] for r in runs if r.get(key) is not None]
        if not values:
            continue
        value = statistics.median(values)
        ratio = (f"max {max(values) * 1e3:.0f} ms" if key == "slowest /ping"
                 else f"{value / limit:.2f}x")
        print(f"| {key} | {value:.3f} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--formats", action=argparse.BooleanOptionalAction, default=True,
                        help="also time /ping while a GGUF and a safetensors folder load")
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    s3, endpoint = start_s3()
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        tensorize("", f"s3://{BUCKET}/{PREFIX}", "float32", endpoint)
        size = client.head_object(Bucket=BUCKET, Key=f"{PREFIX}/model.tensors")["ContentLength"]
        limit = limit_seconds(client, args.runs)
        results = {mode: [cold_start(endpoint, lazy=mode != "background")
                          for _ in range(args.runs)] for mode in ("background", "first-request")}
        formats = other_formats(endpoint, args.runs) if args.formats else {}
        peer = runai_peer(client, endpoint, args.runs)  # last: moto keeps its object in memory
    finally:
        s3.terminate()
    print(f"# {cpu_name()}; {time.strftime('%Y-%m-%d')}; weights {size / 1e6:.0f} MB "
          f"({CHUNK >> 20} MiB ranges)")
    print(f"limit {limit['limit']:.2f} s = import torch {limit['import_torch']:.2f} s + read "
          f"{min(limit['read_one_get'], limit['read_ranged']):.2f} s (one GET "
          f"{limit['read_one_get']:.2f} s, ranged {limit['read_ranged']:.2f} s); medians")
    if isinstance(peer, str):
        print(f"Run:ai Model Streamer: {peer}")
    else:
        for where in ("s3", "file"):
            if where in peer:
                print(f"Run:ai Model Streamer from {where}: {peer[where]}")
                continue
            total = peer[f"{where} import torch"] + peer[f"{where} read"]
            print(f"Run:ai Model Streamer from {where}, fresh process: import torch "
                  f"{peer[f'{where} import torch']:.2f} s, then {peer[f'{where} bytes'] / 1e6:.0f}"
                  f" MB of safetensors into CPU tensors in {peer[f'{where} read']:.2f} s; "
                  f"{total:.2f} s in all ({total / limit['limit']:.2f}x the limit)")
    for mode, runs in results.items():
        print_runs(f"{mode}", runs, limit["limit"])
    for name, runs in formats.items():
        print_runs(f"{name}, background", runs, limit["limit"])


if __name__ == "__main__":
    main()
