"""Auth and TLS: with a key set only `Authorization: Bearer KEY` passes, on every route that does
work (the runtime routes answer 401 themselves, not a wrapped 424); /ping stays open. HTTPS with
a self-signed certificate, checked by a verifying client, and client certificates when asked."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError

from engine import EngineConfig
from tests.handler.server import serve

KEY = "s3cret"
BODY = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}


@pytest.fixture(scope="module")
def keyed_server(tiny_llama_dir):
    with serve(EngineConfig(model=tiny_llama_dir), api_key=KEY) as server:
        yield server


@pytest.mark.parametrize("authorization", [None, KEY, f"Basic {KEY}", "Bearer wrong",
                                           f"Bearer {KEY}x", "Bearer", f"Token {KEY}"])
@pytest.mark.parametrize("route", ["/invocations", "/v1/completions", "/v1/chat/completions",
                                   "/endpoints/e/invocations",
                                   "/endpoints/e/invocations-response-stream"])
def test_only_bearer_key_passes(keyed_server, route, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.post(keyed_server.url + route, json=BODY, headers=headers, timeout=30)
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "API key" in response.json()["error"]["message"]


def test_the_key_opens_every_route_and_ping_stays_open(keyed_server):
    for authorization in (f"Bearer {KEY}", f"bearer {KEY}"):
        headers = {"Authorization": authorization}
        for route, body in [("/invocations", BODY),
                            ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
                            ("/endpoints/e/invocations", BODY)]:
            response = httpx.post(keyed_server.url + route, json=body, headers=headers,
                                  timeout=30)
            assert response.status_code == 200, response.text
        assert httpx.get(keyed_server.url + "/v1/models", headers=headers).status_code == 200
    assert httpx.get(keyed_server.url + "/v1/models").status_code == 401
    assert httpx.get(keyed_server.url + "/ping").status_code == 200


def test_boto3_sees_a_401_not_a_model_error(keyed_server):
    runtime = boto3.client("sagemaker-runtime", endpoint_url=keyed_server.url,
                           region_name="us-east-1", aws_access_key_id="x",
                           aws_secret_access_key="x")
    with pytest.raises(ClientError) as info:
        runtime.invoke_endpoint(EndpointName="e", ContentType="application/json", Body=b"{}")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 401


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 signed by it, and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def issue(subject: str, issuer_key, issuer: str, is_ca: bool, sans=None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None),
                                  critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(issuer_key or key, hashes.SHA256())

    ca_key, ca = issue("test CA", None, "test CA", True)
    paths = {}
    for label, (key, cert) in {
        "ca": (ca_key, ca),
        "server": issue("127.0.0.1", ca_key, "test CA", False,
                        [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        "client": issue("client", ca_key, "test CA", False),
    }.items():
        paths[f"{label}.key"] = folder / f"{label}.key"
        paths[f"{label}.crt"] = folder / f"{label}.crt"
        paths[f"{label}.key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        paths[f"{label}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def test_https_with_a_verifying_client(tiny_llama_dir, tmp_path):
    certs = _certificates(tmp_path)
    with serve(EngineConfig(model=tiny_llama_dir), ssl_keyfile=str(certs["server.key"]),
               ssl_certfile=str(certs["server.crt"])) as server:
        assert server.url.startswith("https://")
        verify = ssl.create_default_context(cafile=str(certs["ca.crt"]))
        response = httpx.post(server.url + "/invocations", json=BODY, verify=verify)
        assert response.status_code == 200 and response.json()[0]["generated_text"]
        with pytest.raises(httpx.ConnectError):  # a client that trusts only the system CAs
            httpx.get(server.url + "/ping")
        with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP on the TLS port
            httpx.get(server.url.replace("https://", "http://") + "/ping")


def test_client_certificates_when_a_ca_is_given(tiny_llama_dir, tmp_path):
    certs = _certificates(tmp_path)
    with serve(EngineConfig(model=tiny_llama_dir), ssl_keyfile=str(certs["server.key"]),
               ssl_certfile=str(certs["server.crt"]), ssl_ca_certs=str(certs["ca.crt"])
               ) as server:
        with_cert = ssl.create_default_context(cafile=str(certs["ca.crt"]))
        with_cert.load_cert_chain(str(certs["client.crt"]), str(certs["client.key"]))
        assert httpx.get(server.url + "/ping", verify=with_cert).status_code == 200
        without = ssl.create_default_context(cafile=str(certs["ca.crt"]))
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url + "/ping", verify=without)
