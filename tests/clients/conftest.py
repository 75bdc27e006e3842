"""What every client test compares with: the offline engine's greedy answer on the same model."""

from __future__ import annotations

import pytest

# Fake credentials: the clients sign their requests, the loopback server does not check them.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def runtime(tiny_server):
    """boto3's SageMaker runtime client, pointed at the local container."""
    import boto3

    return boto3.client("sagemaker-runtime", endpoint_url=tiny_server.url,
                        region_name="us-east-1", aws_access_key_id="x",
                        aws_secret_access_key="x")
