"""S3 for model artifacts: URI parsing, a boto3 client with bounded retries and timeouts, and the
mapping of S3 failures to errors that name the URI and the cause."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.weights.errors import WeightsError

NUM_FILES_IN_FLIGHT = 4  # side files fetched at once (the weights' reads hold up to 4 more)


class S3NotFoundError(WeightsError):
    """The bucket or the key does not exist."""


class S3AccessDeniedError(WeightsError):
    """The credentials may not read (or write) the object."""


class S3UnreachableError(WeightsError):
    """The endpoint did not answer within the retries and timeouts."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {uri!r}")
        return cls(bucket, prefix.strip("/"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def uri(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(name)}" if name else f"s3://{self.bucket}/{self.prefix}"


def s3_client(endpoint: str | None = None) -> Any:
    """A client that gives up in seconds, not minutes, when the endpoint is down."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"}
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def translate_error(error: Exception, uri: str) -> WeightsError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "NoSuchKey", "404", "NotFound"):
            return S3NotFoundError(f"{uri}: not found ({code})")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return S3AccessDeniedError(f"{uri}: access denied ({code})")
        return WeightsError(f"{uri}: S3 error {code}: {error}")
    if isinstance(error, EndpointConnectionError):
        return S3UnreachableError(f"{uri}: S3 endpoint unreachable ({error})")
    if isinstance(error, NoCredentialsError):
        return S3AccessDeniedError(f"{uri}: no AWS credentials found")
    return WeightsError(f"{uri}: {type(error).__name__}: {error}")


def object_size(client: Any, location: S3Location, name: str) -> int:
    """HEAD the object: its size, or a clear error (missing bucket/key, denied, unreachable)."""
    uri = location.uri(name)
    try:
        return int(client.head_object(Bucket=location.bucket, Key=location.key(name))
                   ["ContentLength"])
    except Exception as e:  # noqa: BLE001 - every failure becomes an error naming the URI
        error = translate_error(e, uri)
        if isinstance(error, S3NotFoundError):
            error = _which_is_missing(client, location, uri) or error
        raise error from e


def _which_is_missing(client: Any, location: S3Location, uri: str) -> WeightsError | None:
    try:
        client.head_bucket(Bucket=location.bucket)
    except Exception:  # noqa: BLE001
        return S3NotFoundError(f"{uri}: bucket {location.bucket!r} does not exist")
    return S3NotFoundError(f"{uri}: no such key in bucket {location.bucket!r}")


def download_files(
    client: Any, location: S3Location, names: list[str], dest: Path, required: tuple[str, ...]
) -> None:
    """Fetch the small files next to the weights, several at once (one after another they
    took 0.15 s of a cold start against a loopback server); the `required` ones must exist."""

    def fetch(name: str) -> None:
        try:
            response = client.get_object(Bucket=location.bucket, Key=location.key(name))
            data = response["Body"].read()
        except Exception as e:  # noqa: BLE001
            error = translate_error(e, location.uri(name))
            if name in required or not isinstance(error, S3NotFoundError):
                raise error from e
            return
        (dest / name).write_bytes(data)

    with ThreadPoolExecutor(NUM_FILES_IN_FLIGHT, thread_name_prefix="s3-files") as pool:
        for future in [pool.submit(fetch, name) for name in names]:
            future.result()


def upload_folder(client: Any, folder: Path, location: S3Location) -> None:
    for path in sorted(folder.iterdir()):
        try:
            client.upload_file(str(path), location.bucket, location.key(path.name))
        except Exception as e:  # noqa: BLE001
            raise translate_error(e, location.uri(path.name)) from e
