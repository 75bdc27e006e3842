"""deploy/: the SageMaker script (dry run, and for real against moto's SageMaker and S3 on
loopback), the compose files and the Helm chart's consistency.

The chart is linted (strict) and rendered by Helm's own engine: PyPI's helm-python-sdk embeds
Helm v4, so no helm binary is needed; the rendered manifests are validated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import boto3
import helm_python
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "sagemaker.py"
COMMON = ["--name", "smollm2", "--image", "123.dkr.ecr.us-east-1.amazonaws.com/llm:1",
          "--role", "arn:aws:iam::123456789012:role/SageMakerRole"]


def _run(*args: str, env: dict | None = None) -> list[dict]:
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _call(calls: list[dict], operation: str) -> dict:
    return next(c["args"] for c in calls if c["operation"] == operation)


def test_dry_run_instance_variant(tmp_path):
    (tmp_path / "model.tensors").write_bytes(b"x")
    calls = _run(*COMMON, "--model-dir", str(tmp_path), "--bucket", "b", "--dry-run")
    assert [c["operation"] for c in calls] == [
        "upload_file", "create_model", "create_endpoint_config", "create_endpoint",
        "invoke_endpoint"]
    variant = _call(calls, "create_endpoint_config")["ProductionVariants"][0]
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 1800
    assert "SM_LLM_TENSOR_PARALLEL_SIZE" not in _call(calls, "create_model")[
        "PrimaryContainer"]["Environment"]
    source = _call(calls, "create_model")["PrimaryContainer"]["ModelDataSource"]["S3DataSource"]
    assert source == {"S3Uri": "s3://b/models/llm/", "S3DataType": "S3Prefix",
                      "CompressionType": "None"}


def test_dry_run_tensor_parallel_on_a_multi_gpu_instance():
    calls = _run(*COMMON, "--model-s3", "s3://b/m/", "--instance-type", "ml.g5.12xlarge",
                 "--tensor-parallel-size", "4", "--dry-run")
    env = _call(calls, "create_model")["PrimaryContainer"]["Environment"]
    assert env["SM_LLM_TENSOR_PARALLEL_SIZE"] == "4"


def test_dry_run_serverless(tmp_path):
    calls = _run(*COMMON, "--model-s3", "s3://b/m/", "--serverless", "--memory-mb", "4096",
                 "--dry-run", "--env", "SM_LLM_MAX_NUM_SEQS=8")
    variant = _call(calls, "create_endpoint_config")["ProductionVariants"][0]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 4096, "MaxConcurrency": 4}
    env = _call(calls, "create_model")["PrimaryContainer"]["Environment"]
    assert env == {"SM_LLM_MAX_NUM_SEQS": "8", "SM_LLM_LOAD_ON_FIRST_REQUEST": "true",
                   "SM_LLM_DEVICE": "cpu"}


def test_real_calls_against_moto(tmp_path, s3, s3_endpoint):
    (tmp_path / "config.json").write_text("{}")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "PATH": "/usr/bin:/bin"}
    _run(*COMMON, "--model-dir", str(tmp_path), "--bucket", "models", "--prefix", "deploy",
         "--invoke", "", "--region", "us-east-1", "--s3-endpoint", s3_endpoint,
         "--instance-type", "ml.g4dn.xlarge",  # moto knows an older list of types
         "--sagemaker-endpoint", s3_endpoint, env=env)
    assert s3.get_object(Bucket="models", Key="deploy/config.json")["Body"].read() == b"{}"
    sagemaker = boto3.client("sagemaker", endpoint_url=s3_endpoint, region_name="us-east-1")
    endpoint = sagemaker.describe_endpoint(EndpointName="smollm2")
    assert endpoint["EndpointConfigName"] == "smollm2"
    model = sagemaker.describe_model(ModelName="smollm2")
    assert model["PrimaryContainer"]["Image"].endswith("/llm:1")


def test_compose_and_dashboard():
    compose = yaml.safe_load((ROOT / "deploy/compose/docker-compose.yml").read_text())
    assert set(compose["services"]) == {"llm", "prometheus", "grafana"}
    scrape = yaml.safe_load((ROOT / "deploy/compose/prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["llm:8080"]
    dashboard = json.loads((ROOT / "deploy/compose/grafana/dashboards/llm.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in ("llm_kv_cache_usage_perc", "llm_time_to_first_token_seconds_bucket",
                   "llm_generation_tokens_total", "llm_prefix_cache_hits_total"):
        assert metric in exprs


CHART = ROOT / "deploy/helm/sagemaker-llm"


def _manifests(**values) -> dict[str, dict]:
    """The chart rendered by Helm's own engine (helm-python-sdk embeds Helm v4)."""
    rendered = helm_python.Chart.load(CHART).render(values, name="llm", namespace="default")
    docs = [d for text in rendered.values() for d in yaml.safe_load_all(text) if d]
    return {d["kind"]: d for d in docs}


def test_helm_lints_the_chart_clean():
    report = helm_python.lint(CHART, strict=True)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


def test_nested_value_overrides_merge_with_the_defaults():
    objects = _manifests(image={"tag": "1.2.3"}, probes={"startup": {"failureThreshold": 9}})
    [container] = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "sagemaker-llm:1.2.3"  # repository kept from the defaults
    assert container["startupProbe"]["failureThreshold"] == 9
    assert container["startupProbe"]["periodSeconds"] == 5


def test_helm_chart_renders_valid_manifests():
    objects = _manifests()
    assert set(objects) == {"Deployment", "Service", "HorizontalPodAutoscaler",
                            "PersistentVolumeClaim"}
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/ping", "port": "http"}
    assert container["args"] == ["serve"] and pod["securityContext"]["runAsNonRoot"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SM_LLM_MODEL"] == "/opt/ml/model" and env["SAGEMAKER_BIND_TO_PORT"] == "8080"
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == objects["PersistentVolumeClaim"]["metadata"]["name"]
    selector = objects["Service"]["spec"]["selector"]
    assert selector == objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]


def test_helm_chart_options():
    objects = _manifests(persistence={"enabled": False}, autoscaling={"enabled": False},
                         model="s3://bucket/model", env={"SM_LLM_MAX_NUM_SEQS": "8"},
                         tensorParallelSize=2)
    assert set(objects) == {"Deployment", "Service"}
    [container] = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SM_LLM_MODEL"] == "s3://bucket/model" and env["SM_LLM_MAX_NUM_SEQS"] == "8"
    assert env["SM_LLM_TENSOR_PARALLEL_SIZE"] == "2"
    assert "volumeMounts" not in container
