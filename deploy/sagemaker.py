"""Deploy the container to SageMaker with boto3.

Uploads a tensorized model folder to S3 (uncompressed: SageMaker copies the prefix to
/opt/ml/model), creates the model, an endpoint config (an instance variant with a startup health
check timeout, or a serverless config), the endpoint, waits for it, and invokes it once.
--dry-run prints every API call as JSON instead of making it.

    python deploy/sagemaker.py --name smollm2 \
        --image ACCOUNT.dkr.ecr.REGION.amazonaws.com/llm:latest \
        --role arn:aws:iam::ACCOUNT:role/SageMakerRole --model-dir .cache/models/smollm2 \
        --bucket my-bucket [--serverless --memory-mb 6144] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


class DryRun:
    """Stands in for a boto3 client: prints each call, returns what the next step needs."""

    def __init__(self, service: str):
        self.service = service

    def __getattr__(self, operation: str):
        def call(**kwargs: Any) -> dict[str, Any]:
            print(json.dumps({"service": self.service, "operation": operation, "args": kwargs},
                             default=str))
            return {"Body": _Body(), "ContentType": "application/json"}

        return call


class _Body:
    def read(self) -> bytes:
        return b'"(dry run)"'


def clients(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    if args.dry_run:
        return DryRun("s3"), DryRun("sagemaker"), DryRun("sagemaker-runtime")
    import boto3

    session = boto3.session.Session(region_name=args.region)
    return (session.client("s3", endpoint_url=args.s3_endpoint),
            session.client("sagemaker", endpoint_url=args.sagemaker_endpoint),
            session.client("sagemaker-runtime", endpoint_url=args.runtime_endpoint))


def upload(s3: Any, folder: Path, bucket: str, prefix: str) -> str:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            s3.upload_file(Filename=str(path), Bucket=bucket, Key=f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}/"


def variant(args: argparse.Namespace) -> dict[str, Any]:
    base = {"VariantName": "AllTraffic", "ModelName": args.name}
    if args.serverless:
        return {**base, "ServerlessConfig": {"MemorySizeInMB": args.memory_mb,
                                             "MaxConcurrency": args.max_concurrency}}
    return {**base, "InstanceType": args.instance_type, "InitialInstanceCount": args.instances,
            "ContainerStartupHealthCheckTimeoutInSeconds": args.startup_timeout,
            "ModelDataDownloadTimeoutInSeconds": args.startup_timeout}


def environment(args: argparse.Namespace) -> dict[str, str]:
    env = dict(item.split("=", 1) for item in args.env)
    if args.tensor_parallel_size > 1:  # the instance's GPUs (ml.g5.12xlarge: 4)
        env.setdefault("SM_LLM_TENSOR_PARALLEL_SIZE", str(args.tensor_parallel_size))
    if args.serverless:
        env.setdefault("SM_LLM_LOAD_ON_FIRST_REQUEST", "true")  # /ping must pass in 3 min
        env.setdefault("SM_LLM_DEVICE", "cpu")
    return env


def deploy(args: argparse.Namespace) -> int:
    s3, sagemaker, runtime = clients(args)
    model_url = args.model_s3 or upload(s3, Path(args.model_dir), args.bucket, args.prefix)
    sagemaker.create_model(
        ModelName=args.name, ExecutionRoleArn=args.role,
        PrimaryContainer={
            "Image": args.image, "Environment": environment(args),
            "ModelDataSource": {"S3DataSource": {"S3Uri": model_url, "S3DataType": "S3Prefix",
                                                 "CompressionType": "None"}},
        },
    )
    sagemaker.create_endpoint_config(EndpointConfigName=args.name,
                                     ProductionVariants=[variant(args)])
    sagemaker.create_endpoint(EndpointName=args.name, EndpointConfigName=args.name)
    if not args.dry_run:
        sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=args.name)
    if args.invoke:
        body = {"inputs": args.invoke, "parameters": {"max_new_tokens": 32}}
        response = runtime.invoke_endpoint(EndpointName=args.name, Body=json.dumps(body),
                                           ContentType="application/json")
        print(response["Body"].read().decode())
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="model, endpoint config and endpoint name")
    p.add_argument("--image", required=True, help="the container image URI (ECR)")
    p.add_argument("--role", required=True, help="SageMaker execution role ARN")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", help="a local tensorized model folder to upload")
    source.add_argument("--model-s3", help="an s3:// prefix already holding the model")
    p.add_argument("--bucket", help="bucket for --model-dir")
    p.add_argument("--prefix", default="models/llm", help="key prefix for --model-dir")
    p.add_argument("--serverless", action="store_true", help="a serverless endpoint (CPU)")
    p.add_argument("--memory-mb", type=int, default=6144, choices=[1024, 2048, 3072, 4096,
                                                                   5120, 6144])
    p.add_argument("--max-concurrency", type=int, default=4)
    p.add_argument("--instance-type", default="ml.g5.xlarge")
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model across this many GPUs of the instance")
    p.add_argument("--startup-timeout", type=int, default=1800,
                   help="ContainerStartupHealthCheckTimeoutInSeconds (60-3600)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="container environment (SM_LLM_* settings)")
    p.add_argument("--invoke", default="The capital of France is",
                   help="a prompt to send once the endpoint is up ('' to skip)")
    p.add_argument("--region", default=None)
    p.add_argument("--s3-endpoint", default=None)
    p.add_argument("--sagemaker-endpoint", default=None)
    p.add_argument("--runtime-endpoint", default=None)
    p.add_argument("--dry-run", action="store_true", help="print the API calls, make none")
    args = p.parse_args(argv)
    if args.model_dir and not args.bucket:
        p.error("--model-dir needs --bucket")
    if not 60 <= args.startup_timeout <= 3600:
        p.error("--startup-timeout must be in 60..3600")
    return args


if __name__ == "__main__":
    sys.exit(deploy(parse_args(sys.argv[1:])))
