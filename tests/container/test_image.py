"""The CPU variant of the image, built and run with podman: `serve` with a mounted /opt/ml/model
holding the tensorized embedded model answers /ping and /invocations through the published port,
gives the offline engine's greedy text, runs the C++ CPU kernels built into it, and stops cleanly
on SIGTERM.

Needs podman, runc and the image built by scripts/container/build.sh (`make test-container`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import httpx
import pytest

from engine import LLM, SamplingParams
from engine.weights.tensorize import tensorize

pytestmark = pytest.mark.container
IMAGE = os.environ.get("CONTAINER_IMAGE", "localhost/sagemaker-llm:cpu")


def _podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if shutil.which("podman") is None or _podman("image", "exists", IMAGE).returncode != 0:
        pytest.fail(f"podman or the image {IMAGE} is missing: run scripts/container/build.sh")
    folder = tmp_path_factory.mktemp("opt-ml") / "model"
    tensorize("", str(folder), "bfloat16")
    # The container runs as uid 10001: it must be able to read the mounted model.
    for path in [folder.parent, folder, *folder.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_image_serves_and_stops_cleanly(model_dir):
    port = _free_port()
    name = f"sagemaker-llm-test-{port}"
    started = _podman(
        "run", "-d", "--name", name, "--ulimit", "nofile=1024:1024", "--ulimit",
        "nproc=1024:1024", "-p", f"127.0.0.1:{port}:8080", "-v",
        f"{model_dir}:/opt/ml/model:ro", "-e", "SM_LLM_MAX_MODEL_LEN=1024", IMAGE, "serve",
    )
    assert started.returncode == 0, started.stderr
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, status = time.monotonic() + 180, None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(url + "/ping", timeout=2)
                if status.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert status is not None and status.status_code == 200, _podman("logs", name).stdout
        body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 12}}
        response = httpx.post(url + "/invocations", json=body, timeout=60)
        assert response.status_code == 200
        expected = LLM(str(model_dir), max_model_len=1024).generate(
            [body["inputs"]], SamplingParams(temperature=0, max_tokens=12))[0].text
        assert response.json() == [{"generated_text": expected}]
        chat = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
        answer = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60)
        assert answer.status_code == 200, answer.text  # the chat template renders in the image
        assert answer.json()["choices"][0]["message"]["content"]
        # The C++ CPU kernels come built in the image (it has no compiler) and are loaded.
        for _ in range(60):  # a liveness bound for the background load, not a timing assert
            logs = _podman("logs", name)
            if "attention: C++ CPU kernels" in logs.stdout + logs.stderr:
                break
            time.sleep(0.5)
        assert "attention: C++ CPU kernels" in logs.stdout + logs.stderr, logs.stderr[-2000:]
        inspect = _podman("inspect", "--format", "{{.Config.User}}", name)
        assert inspect.stdout.strip() == "10001"
        assert _podman("stop", "-t", "30", name).returncode == 0
        exit_code = _podman("inspect", "--format", "{{.State.ExitCode}}", name)
        assert exit_code.stdout.strip() == "0", _podman("logs", name).stdout
    finally:
        _podman("rm", "-f", name)
