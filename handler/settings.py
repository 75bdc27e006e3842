"""Server settings: command-line flags, each also settable as an `SM_LLM_*` environment variable.

`SM_LLM_MAX_NUM_SEQS=64` is `--max-num-seqs 64`; booleans take true/false
(`SM_LLM_ENABLE_PREFIX_CACHING=false` is `--no-enable-prefix-caching`). Flags win over the
environment. The port defaults to `SAGEMAKER_BIND_TO_PORT`, else 8080. Only `__main__` passes the
real environment in; everything else receives the frozen settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass

from engine.config import EngineConfig, SpeculativeConfig

ENV_PREFIX = "SM_LLM_"
DEFAULT_MODEL_DIR = "/opt/ml/model"
MAX_BODY_BYTES = 6 * 1024 * 1024  # SageMaker's realtime payload limit


class SettingsError(ValueError):
    """A bad flag or environment variable; the message names it."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8080
    served_model_name: str = "default"
    api_key: str | None = None
    load_on_first_request: bool = False
    engine_process: bool = True  # the engine in a process of its own (off: a thread of this one)
    first_request_load_timeout: float = 50.0  # seconds; inside SageMaker's 60 s invocation limit
    max_body_bytes: int = MAX_BODY_BYTES
    max_pending_requests: int = 1024
    default_max_new_tokens: int = 30  # LMI's default for TGI-style requests
    graceful_shutdown_seconds: float = 25.0  # SageMaker kills 30 s after SIGTERM
    log_level: str = "info"
    request_timeout: float | None = None  # seconds from arrival to the last token; None: none
    timeout_keep_alive: float = 5.0
    timeout_request_headers: float = 10.0  # a request's line and headers must arrive in this
    timeout_request_body: float = 30.0  # and its body in this
    max_connections: int = 2048  # open connections; idle ones are closed first past it
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise SettingsError(f"--port must be in 1..65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise SettingsError("--max-body-bytes must be at least 1024")
        if self.max_pending_requests < 1:
            raise SettingsError("--max-pending-requests must be >= 1")
        if self.first_request_load_timeout <= 0:
            raise SettingsError("--first-request-load-timeout must be > 0")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise SettingsError("--request-timeout must be > 0")
        for name in ("timeout_keep_alive", "timeout_request_headers", "timeout_request_body"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"--{name.replace('_', '-')} must be > 0")
        if self.max_connections < 8:
            raise SettingsError("--max-connections must be at least 8")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise SettingsError("--ssl-keyfile and --ssl-certfile go together")
        if self.ssl_ca_certs is not None and self.ssl_certfile is None:
            raise SettingsError("--ssl-ca-certs needs --ssl-keyfile and --ssl-certfile")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # raise instead of exiting, so callers report it
        raise SettingsError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m handler",
        description="SageMaker-style LLM server. Every flag can also be given as an environment "
        f"variable {ENV_PREFIX}<FLAG_NAME> (for example {ENV_PREFIX}MAX_NUM_SEQS=64).",
    )
    add = p.add_argument
    add("--model", default=DEFAULT_MODEL_DIR,
        help="model folder (tensorizer or safetensors), .gguf file, s3://bucket/prefix, or "
        "'default' for the embedded SmolLM2-135M-Instruct (default: /opt/ml/model)")
    add("--served-model-name", default=None, help="model name in OpenAI responses")
    add("--host", default="0.0.0.0", help="address to bind (default: 0.0.0.0)")
    add("--port", type=int, default=None,
        help="port (default: $SAGEMAKER_BIND_TO_PORT, else 8080)")
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations dtype (auto: fp32 on CPU, bf16 there with w8a8 / w4a8 "
        "where the CPU has native bf16; the model's dtype on GPU)")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--max-model-len", type=int, default=None,
        help="longest prompt plus output, in tokens (default: the model's)")
    add("--max-num-seqs", type=int, default=64, help="sequences decoded together at most")
    add("--max-num-batched-tokens", type=int, default=1024,
        help="token budget of one step; longer prompts are prefilled in chunks")
    add("--block-size", type=int, default=16, help="tokens per KV-cache block")
    add("--kv-cache-memory", type=int, default=None,
        help="KV-cache bytes (default: 1 GiB on CPU, a fraction of free memory on GPU)")
    add("--gpu-memory-utilization", type=float, default=0.9,
        help="share of free GPU memory for the KV cache")
    add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
        help="reuse the KV cache of shared prompt prefixes")
    add("--attention-backend", default=None, choices=["torch", "triton", "cpu"],
        help="attention kernels (default: triton on GPU; on the CPU the C++ kernels, the torch "
        "references until they are loaded or built)")
    add("--s3-endpoint", default=None,
        help="S3-compatible endpoint for s3:// models (default: $AWS_ENDPOINT_URL_S3, "
        "$AWS_ENDPOINT_URL, else AWS)")
    add("--compile-decode", action=argparse.BooleanOptionalAction, default=False,
        help="CPU: compile the one-sequence decode step in the background (~50 s of CPU, a C++ "
        "compiler and a second copy of the weights; 1.4x at one sequence) and swap it in")
    add("--quantization", default=None, choices=["int8", "int4", "w8a8", "w4a8"],
        help="CPU: weights read as int8 (per group of 32, llama.cpp's Q8_0) or int4 (Q4_1; the "
        "output head int8) by the small-batch kernels, where a step streams every weight: a "
        "quarter or a sixth of fp32's bytes; oneDNN's larger batches use their dequantized "
        "values. w8a8: int8 weights and each linear's input rounded to int8 per group of 32 "
        "(llama.cpp's Q8_0 arithmetic), multiplied in int8 at every batch size (AVX512-VNNI or "
        "AVX2): the fastest from a few users up. w4a8: the same with int4's weights (llama.cpp's "
        "Q4_1 x Q8_1; the output head w8a8): half w8a8's bytes a step")
    add("--speculative-config", default=None, metavar="JSON",
        help='speculative decoding by prompt lookup, as vLLM\'s flag: \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_max": 3}\' (optional "prompt_lookup_min", '
        '"max_num_seqs": drafts only while at most that many sequences run, default 4). Greedy '
        "requests get the same tokens, several a step where the text repeats itself")
    add("--tensor-parallel-size", type=int, default=1,
        help="split the model across this many ranks (worker processes on this host; gloo on "
        "the CPU, NCCL on GPUs)")
    add("--distributed-executor-backend", default="mp", choices=["mp", "ray"],
        help="where ranks 1..N-1 run: mp, processes on this host; ray, actors of a Ray cluster "
        "(pip install '.[ray]'; RAY_ADDRESS to join one)")
    add("--verify-weights", action=argparse.BooleanOptionalAction, default=True,
        help="check the weights' checksums while loading (S3: the manifest's XXH3-128 as the "
        "bytes arrive; a folder, or an older manifest without it: tensorizer's per-tensor "
        "ones); a mismatch fails the load; --no-verify-weights skips it")
    add("--engine-process", action=argparse.BooleanOptionalAction, default=True,
        help="run the engine in a process of its own, so the HTTP side never competes with a "
        "step for the GIL (--no-engine-process: a thread of the server's process)")
    add("--load-on-first-request", action=argparse.BooleanOptionalAction, default=False,
        help="serverless mode: /ping is 200 at once, the first invocation loads the model")
    add("--first-request-load-timeout", type=float, default=50.0,
        help="seconds the first invocation waits for the load in that mode")
    add("--api-key", default=None,
        help="require 'Authorization: Bearer KEY' (off: SageMaker authenticates callers)")
    add("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request body")
    add("--max-pending-requests", type=int, default=1024,
        help="requests queued or running before new ones get 429")
    add("--default-max-new-tokens", type=int, default=30,
        help="max_new_tokens of TGI/LMI requests that do not say")
    add("--graceful-shutdown-seconds", type=float, default=25.0,
        help="on SIGTERM, how long in-flight requests may finish; open streams then end with "
        "an error record")
    add("--request-timeout", type=float, default=None,
        help="seconds a request may take from arrival to its last token (default: no limit); "
        "past it a stream ends with an error record, a plain request gets 503")
    add("--timeout-keep-alive", type=float, default=5.0,
        help="seconds an idle keep-alive connection stays open")
    add("--timeout-request-headers", type=float, default=10.0,
        help="seconds for a request's line and headers to arrive (slow clients are cut off)")
    add("--timeout-request-body", type=float, default=30.0,
        help="seconds for a request's body to arrive")
    add("--max-connections", type=int, default=2048,
        help="open connections at most (capped by the open-files limit); past it idle "
        "connections are closed first, then new ones get 503")
    add("--ssl-keyfile", default=None, help="serve HTTPS with this private key (PEM)")
    add("--ssl-certfile", default=None, help="serve HTTPS with this certificate chain (PEM)")
    add("--ssl-ca-certs", default=None,
        help="CA bundle to verify client certificates against (mutual TLS)")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _env_to_argv(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> list[str]:
    actions = {
        a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"
    }
    argv: list[str] = []
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        flag = "--" + name[len(ENV_PREFIX):].lower().replace("_", "-")
        action = actions.get(flag)
        if action is None:
            raise SettingsError(f"unknown setting {name} (no flag {flag})")
        if isinstance(action, argparse.BooleanOptionalAction):
            if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise SettingsError(f"{name} must be true or false, got {value!r}")
            is_on = value.lower() in ("1", "true", "yes")
            argv.append(flag if is_on else "--no-" + flag[2:])
        else:
            argv += [flag, value]
    return argv


def parse_settings(
    argv: list[str], environ: Mapping[str, str]
) -> tuple[ServerSettings, EngineConfig]:
    parser = build_parser()
    args = parser.parse_args(_env_to_argv(parser, environ) + list(argv))
    model = "" if args.model in ("default", "") else args.model
    port = args.port or _int_env(environ, "SAGEMAKER_BIND_TO_PORT") or 8080
    s3_endpoint = (
        args.s3_endpoint or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    )
    try:
        engine = EngineConfig(
            model=model, dtype=args.dtype, device=args.device, block_size=args.block_size,
            kv_cache_memory=args.kv_cache_memory,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=args.enable_prefix_caching, max_model_len=args.max_model_len,
            attention_backend=args.attention_backend, s3_endpoint=s3_endpoint,
            verify_weights=args.verify_weights, compile_decode=args.compile_decode,
            quantization=args.quantization, tensor_parallel_size=args.tensor_parallel_size,
            distributed_executor_backend=args.distributed_executor_backend,
            speculative=_speculative_config(args.speculative_config),
        )
        server = ServerSettings(
            host=args.host, port=port,
            served_model_name=args.served_model_name or _model_name(model),
            api_key=args.api_key, load_on_first_request=args.load_on_first_request,
            engine_process=args.engine_process,
            first_request_load_timeout=args.first_request_load_timeout,
            max_body_bytes=args.max_body_bytes, max_pending_requests=args.max_pending_requests,
            default_max_new_tokens=args.default_max_new_tokens,
            graceful_shutdown_seconds=args.graceful_shutdown_seconds, log_level=args.log_level,
            request_timeout=args.request_timeout, timeout_keep_alive=args.timeout_keep_alive,
            timeout_request_headers=args.timeout_request_headers,
            timeout_request_body=args.timeout_request_body, max_connections=args.max_connections,
            ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
            ssl_ca_certs=args.ssl_ca_certs,
        )
    except ValueError as e:
        raise SettingsError(str(e)) from e
    return server, engine


def _speculative_config(text: str | None) -> SpeculativeConfig | None:
    if not text:
        return None
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise SettingsError(f"--speculative-config is not JSON: {e}") from e
    if not isinstance(fields, dict):
        raise SettingsError("--speculative-config must be a JSON object")
    known = {f.name for f in dataclasses.fields(SpeculativeConfig)}
    if unknown := sorted(set(fields) - known):
        raise SettingsError(f"--speculative-config: unknown field(s) {unknown}; known: "
                            f"{sorted(known)}")
    return SpeculativeConfig(**fields)  # a bad value: ValueError, reported as a SettingsError


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError as e:
        raise SettingsError(f"{name} must be a port number, got {value!r}") from e


def _model_name(model: str) -> str:
    if not model:
        return "SmolLM2-135M-Instruct"
    return model.rstrip("/").rsplit("/", 1)[-1] or model
