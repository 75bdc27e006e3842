"""The server protects itself from its connections: uvicorn's h11 protocol with a deadline on
every request's headers (slowloris) and a cap on open connections.

Past the cap, the connection idle the longest (waiting for a request's headers, or kept alive
between requests) is closed to make room, so that a flood of idle or slow connections never
locks out `/ping`; only when every connection is busy with a request does a new one get a 503.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

# File descriptors kept for everything but client connections (model files, S3, logs...).
RESERVED_FDS = 128


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            logger.warning("could not raise the open-files limit to %s: %s", target, e)
    return soft


def connection_cap(max_connections: int) -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(8, min(max_connections, soft - RESERVED_FDS))


class ConnectionGuard:
    """The open connections, and since when each has been idle (None: busy with a request)."""

    def __init__(self, max_connections: int, timeout_request_headers: float):
        self.max_connections = max_connections
        self.timeout_request_headers = timeout_request_headers
        self.idle_since: dict[GuardedH11Protocol, float | None] = {}
        self.num_evicted = 0
        self.num_refused = 0

    def admit(self, connection: GuardedH11Protocol) -> bool:
        """Make room for `connection`: False if every open connection is busy."""
        if len(self.idle_since) >= self.max_connections:
            idle = [(since, c) for c, since in self.idle_since.items() if since is not None]
            if not idle:
                self.num_refused += 1
                return False
            _, oldest = min(idle, key=lambda pair: pair[0])
            self.num_evicted += 1
            oldest.evict()
        self.idle_since[connection] = time.monotonic()
        return True

    def set_idle(self, connection: GuardedH11Protocol, is_idle: bool) -> None:
        if connection in self.idle_since:
            self.idle_since[connection] = time.monotonic() if is_idle else None

    def remove(self, connection: GuardedH11Protocol) -> None:
        self.idle_since.pop(connection, None)


def _raw_response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": reason.replace(" ", ""),
                                 "param": None, "code": status}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\nretry-after: 1\r\n\r\n")
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    guard: ConnectionGuard  # set on the subclass `guarded_protocol` makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_timer: Any = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            logger.warning("connection refused: all %d connections are busy",
                           self.guard.max_connections)
            transport.write(_raw_response(503, "Service Unavailable",
                                          "too many connections, all busy; retry later"))
            transport.close()
            return
        self._await_headers()

    def _await_headers(self) -> None:
        self.guard.set_idle(self, True)
        self._cancel_headers_timer()
        self._headers_timer = self.loop.call_later(
            self.guard.timeout_request_headers, self._headers_timed_out
        )

    def _cancel_headers_timer(self) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None

    def _headers_timed_out(self) -> None:
        self._headers_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self.conn.trailing_data[0]:  # part of a request came: say why it is cut off
                self.transport.write(_raw_response(
                    408, "Request Timeout", "the request's headers took too long to arrive"))
            self.transport.close()

    def evict(self) -> None:
        """Close this idle connection to make room for a new one."""
        self._cancel_headers_timer()
        self.guard.remove(self)
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._check_request_started()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            if self.conn.their_state is h11.IDLE:
                self._await_headers()
            else:
                self._check_request_started()  # a pipelined request is already in

    def _check_request_started(self) -> None:
        if self.conn.their_state is not h11.IDLE and self._headers_timer is not None:
            self._cancel_headers_timer()
            self.guard.set_idle(self, False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_headers_timer()
        self.guard.remove(self)
        super().connection_lost(exc)


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """A protocol class for uvicorn's `http=` bound to `guard`."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})
