"""`aws sagemaker-runtime invoke-endpoint --endpoint-url http://127.0.0.1:PORT`."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.clients.conftest import AWS_ENV
from tests.prompts import tgi_body


def test_aws_cli_invoke_endpoint(tiny_server, expected, tmp_path):
    out = tmp_path / "out.json"
    env = {**AWS_ENV, "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-m", "awscli", "sagemaker-runtime", "invoke-endpoint",
         "--endpoint-url", tiny_server.url, "--endpoint-name", "my-endpoint",
         "--content-type", "application/json", "--body", tgi_body(), str(out)],
        check=True, env=env, timeout=60, capture_output=True,
    )
    assert json.loads(out.read_text()) == [{"generated_text": expected}]
