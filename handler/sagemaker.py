"""The SageMaker runtime's side of the wire, emulated: the AWS event-stream framing of
InvokeEndpointWithResponseStream, and the ModelError shape of a container error.

An event-stream message: total length and headers length (4 bytes each, big-endian), the CRC32 of
those 8 bytes, the headers, the payload, the CRC32 of everything before it. A header: name length
(1 byte), name, type 7 (string), value length (2 bytes), value.
"""

from __future__ import annotations

import json
import struct
import zlib

VARIANT_HEADER = "x-Amzn-Invoked-Production-Variant"
CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
DEFAULT_VARIANT = "AllTraffic"
EVENT_STREAM_CONTENT_TYPE = "application/vnd.amazon.eventstream"


def _header(name: str, value: str) -> bytes:
    name_bytes, value_bytes = name.encode(), value.encode()
    return (struct.pack(">B", len(name_bytes)) + name_bytes + b"\x07"
            + struct.pack(">H", len(value_bytes)) + value_bytes)


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    header_bytes = b"".join(_header(k, v) for k, v in headers.items())
    total_length = 12 + len(header_bytes) + len(payload) + 4
    prelude = struct.pack(">II", total_length, len(header_bytes))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + header_bytes + payload
    return message + struct.pack(">I", zlib.crc32(message))


def payload_part(data: bytes) -> bytes:
    return encode_message({
        ":event-type": "PayloadPart",
        ":content-type": "application/octet-stream",
        ":message-type": "event",
    }, data)


def model_stream_error(message: str, error_code: str = "ModelStreamError") -> bytes:
    body = json.dumps({"Message": message, "ErrorCode": error_code}).encode()
    return encode_message({
        ":exception-type": "ModelStreamError",
        ":content-type": "application/json",
        ":message-type": "exception",
    }, body)


def model_error_body(status: int, message: str) -> dict:
    """What the runtime answers (HTTP 424) when the container answered non-2xx."""
    kind = "client" if 400 <= status < 500 else "server"
    return {
        "ErrorCode": f"{kind.upper()}_ERROR_FROM_MODEL",
        "Message": f"Received {kind} error ({status}) from primary with message \"{message}\".",
        "OriginalMessage": message,
        "OriginalStatusCode": status,
    }
