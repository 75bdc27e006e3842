"""S3 faults in the middle of a read, and temporary credentials: a connection lost mid-object is
resumed from the byte where it broke (the tokens stay exact), or named as such when it keeps
breaking; temporary credentials from the loopback server's STS reach S3 with their session token;
a corrupted weights file fails the load, and /ping says which file and which tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import boto3
import httpx
import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.weights import s3_reader
from engine.weights.prefetch import prefetch_weights
from engine.weights.s3 import S3AccessDeniedError
from engine.weights.s3_reader import S3ReadError
from engine.weights.tensorize import tensorize
from tests.handler.server import serve
from tests.s3_proxy import s3_proxy
from tests.s3_server import set_auth_enforced
from tests.tiny_models import hf_greedy, random_prompts

PROMPTS = random_prompts(4, 1, 40, seed=31)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
URI = "s3://models/tiny-faults"


@pytest.fixture(scope="module")
def tiny_on_s3(tiny_llama_dir, s3, s3_endpoint) -> str:
    tensorize(tiny_llama_dir, URI, "float32", s3_endpoint)
    return URI


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(s3_reader, "RANGE_BYTES", 64 << 10)  # several ranged GETs per object


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_a_connection_lost_mid_read_is_resumed(tiny_llama_dir, tiny_on_s3, s3_endpoint,
                                               small_chunks):
    with s3_proxy(s3_endpoint) as (endpoint, control):
        control.cut_key, control.cut_after_bytes, control.num_cuts_left = (
            "tiny-faults/model.tensors", 10_000, 3)
        llm = LLM(tiny_on_s3, s3_endpoint=endpoint)
    assert control.num_cuts_left == 0  # three connections broke mid-range
    ranges = [r["headers"].get("range") for r in control.requests
              if r["path"].endswith("model.tensors") and r["method"] == "GET"]
    starts = {int(r.removeprefix("bytes=").split("-")[0]) for r in ranges}
    assert any(start % (64 << 10) == 10_000 for start in starts), ranges  # resumed mid-range
    assert _tokens(llm) == [hf_greedy(tiny_llama_dir, p, 8) for p in PROMPTS]


def test_a_connection_that_keeps_breaking_is_named(tiny_on_s3, s3_endpoint, small_chunks):
    with s3_proxy(s3_endpoint) as (endpoint, control):
        control.cut_key, control.cut_after_bytes, control.num_cuts_left = (
            "tiny-faults/model.tensors", 1000, 1000)
        with pytest.raises(S3ReadError) as info:
            LLM(tiny_on_s3, s3_endpoint=endpoint)
    message = str(info.value)
    assert "connection lost at byte" in message and f"{URI}/model.tensors" in message


def test_a_stream_slower_than_the_wire_is_split_into_ranges(tiny_llama_dir, tiny_on_s3,
                                                           s3_endpoint, monkeypatch):
    monkeypatch.setattr(s3_reader, "MIN_RANGE_BYTES", 16 << 10)
    monkeypatch.setattr(s3_reader, "SPLIT_AFTER_S", 0.01)
    monkeypatch.setattr(s3_reader, "SPLIT_IF_REMAINING_S", 0.01)
    with s3_proxy(s3_endpoint) as (endpoint, control):
        control.slow_key, control.slow_seconds_per_piece = "tiny-faults/model.tensors", 0.05
        llm = LLM(tiny_on_s3, s3_endpoint=endpoint)
    ranges = [r["headers"]["range"] for r in control.requests
              if r["path"].endswith("model.tensors") and r["method"] == "GET"]
    assert ranges[0] == "bytes=0-" and len(ranges) > 2, ranges  # one stream, then ranges
    assert _tokens(llm) == [hf_greedy(tiny_llama_dir, p, 8) for p in PROMPTS]


def _temporary_credentials(endpoint: str) -> dict:
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    trust = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    role = iam.create_role(RoleName="model-reader", AssumeRolePolicyDocument=json.dumps(trust))
    iam.put_role_policy(RoleName="model-reader", PolicyName="s3",
                        PolicyDocument=json.dumps(policy))
    sts = boto3.client("sts", endpoint_url=endpoint, region_name="us-east-1")
    return sts.assume_role(RoleArn=role["Role"]["Arn"], RoleSessionName="sagemaker")[
        "Credentials"]


def test_temporary_credentials_reach_s3_with_their_token(tiny_llama_dir, tiny_on_s3,
                                                         s3_endpoint, monkeypatch):
    credentials = _temporary_credentials(s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", credentials["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", credentials["SecretAccessKey"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", credentials["SessionToken"])
    set_auth_enforced(s3_endpoint, True)  # the server now checks keys and session tokens
    try:
        with s3_proxy(s3_endpoint) as (endpoint, control):
            llm = LLM(tiny_on_s3, s3_endpoint=endpoint)
        weights_requests = [r for r in control.requests if r["path"].endswith("model.tensors")]
        assert weights_requests and all(
            r["headers"].get("x-amz-security-token") == credentials["SessionToken"]
            for r in weights_requests)
        assert _tokens(llm) == [hf_greedy(tiny_llama_dir, p, 8) for p in PROMPTS]
        monkeypatch.delenv("AWS_SESSION_TOKEN")  # without its token the key is refused
        with pytest.raises(S3AccessDeniedError):
            LLM(tiny_on_s3, s3_endpoint=s3_endpoint)
    finally:
        set_auth_enforced(s3_endpoint, False)


def test_corrupted_weights_fail_ping_naming_file_and_tensor(tiny_on_s3, s3, s3_endpoint):
    key = "tiny-faults/model.tensors"
    body = bytearray(s3.get_object(Bucket="models", Key=key)["Body"].read())
    for i in range(len(body) - 4096, len(body) - 4000):
        body[i] ^= 0xFF  # same size, bytes flipped in place inside the last tensor's data
    for obj in s3.list_objects_v2(Bucket="models", Prefix="tiny-faults/")["Contents"]:
        name = obj["Key"].split("/")[-1]
        data = bytes(body) if name == "model.tensors" else s3.get_object(
            Bucket="models", Key=obj["Key"])["Body"].read()
        s3.put_object(Bucket="models", Key=f"tiny-flipped/{name}", Body=data)
    config = EngineConfig(model="s3://models/tiny-flipped", s3_endpoint=s3_endpoint)
    with serve(config, wait_ready=False) as server:
        server.state.loader.wait(60)
        ping = httpx.get(server.url + "/ping")
    assert ping.status_code == 500
    reason = ping.json()["reason"]
    assert "checksum mismatch" in reason and "s3://models/tiny-flipped/model.tensors" in reason
    assert "lm_head.weight" in reason


def _status_of_engine_process_load(config: EngineConfig, is_lazy: bool = False) -> dict:
    """Load `config` in an engine process (spawned first, as `--load-on-first-request` does, if
    `is_lazy`); its status once the load has ended."""
    from engine.process_client import EngineProcessClient

    client = EngineProcessClient(config)
    if is_lazy:
        client.spawn()
    client.start()
    try:
        assert client.wait(120)
        return client.status()
    finally:
        client.shutdown()


@pytest.mark.parametrize("is_lazy", [False, True])
def test_an_engine_process_reads_its_weights_once(tiny_on_s3, s3_endpoint, is_lazy):
    """The engine's process starts the read before its imports (`run_engine_process`), told to
    load at once or spawned first (`--load-on-first-request`), and the load takes that read: one
    GET of the weights either way, none twice."""
    with s3_proxy(s3_endpoint) as (endpoint, control):
        status = _status_of_engine_process_load(EngineConfig(model=URI, s3_endpoint=endpoint),
                                                is_lazy)
        assert status["status"] == "ready"
    gets = [r for r in control.requests
            if r["path"].endswith("tiny-faults/model.tensors") and r["method"] == "GET"]
    assert len(gets) == 1, gets


def test_an_early_read_that_cannot_start_leaves_the_load_to_say_why(tiny_on_s3, s3_endpoint,
                                                                    monkeypatch):
    """The engine's process starts its read before anything reports for it: a failure there (a
    missing AWS profile: boto3 refuses to make a client) is the load's to report, in /ping's
    reason, not an engine process gone without one."""
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    status = _status_of_engine_process_load(EngineConfig(model=URI, s3_endpoint=s3_endpoint))
    assert status["status"] == "failed" and "no-such-profile" in status["reason"], status


def test_a_fetch_that_dies_mid_read_fails_the_read_naming_where(tiny_on_s3, s3_endpoint):
    """A CPU load's early read runs in a fetch process (engine/weights/fetch.py): killed with
    the object half in, a read past that byte fails with the byte and the exit, at once, and
    the bytes that came are there."""
    with s3_proxy(s3_endpoint) as (endpoint, control):
        control.hold_key, control.hold_from_byte = "tiny-faults/model.tensors", 100_000
        early = prefetch_weights(URI, endpoint, in_memory=True)
        try:
            fetched = early.reader()
            assert control.held.wait(30)
            early._fetch.kill()
            with pytest.raises(S3ReadError, match=r"stopped at byte \d+ of .*exited with -9"):
                fetched.arrived(fetched.size)
            assert fetched.num_arrived < 100_000 < fetched.size
        finally:
            control.release.set()
            early.close()


def test_a_fetch_whose_engine_is_gone_stops(tiny_on_s3, s3_endpoint, tmp_path):
    """The fetch process stops reading once nobody reads its lines (the engine's process died
    mid-load): at its next line, quietly."""
    fd = os.memfd_create("test-weights")
    with s3_proxy(s3_endpoint) as (endpoint, control):
        control.hold_key, control.hold_from_byte = "tiny-faults/model.tensors", 100_000
        fetch = subprocess.Popen(
            [sys.executable, "-m", "engine.weights.fetch", URI, str(tmp_path), "--fd", str(fd),
             "--endpoint", endpoint], pass_fds=(fd,), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        try:
            assert json.loads(fetch.stdout.readline())["size"] > 100_000
            assert control.held.wait(30)
            fetch.stdout.close()  # the engine's end of the pipe, gone
            control.release.set()
            assert fetch.wait(30) == 1
            assert "Traceback" not in fetch.stderr.read()
        finally:
            control.release.set()
            fetch.kill()
            os.close(fd)
