"""An HTTP proxy on 127.0.0.1 in front of the loopback S3 server, for faults the server itself
cannot make: it records every request (headers and query), can cut a response off after N bytes,
and can hold the weights' responses until the test lets them go."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class ProxyControl:
    upstream: str  # host:port of the S3 server
    requests: list[dict] = field(default_factory=list)
    cut_key: str | None = None  # cut GET responses of keys ending in this
    cut_after_bytes: int = 0
    num_cuts_left: int = 0
    slow_key: str | None = None  # GET responses of keys ending in this trickle:
    slow_seconds_per_piece: float = 0.0  # a pause before each 64 KiB
    hold_key: str | None = None  # hold GET responses of keys ending in this...
    hold_from_byte: int = 0  # ...at this byte of the object...
    release: threading.Event = field(default_factory=threading.Event)  # ...until this is set
    held: threading.Event = field(default_factory=threading.Event)  # set once one is held
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_cut(self, path: str) -> bool:
        with self.lock:
            if self.cut_key and path.endswith(self.cut_key) and self.num_cuts_left > 0:
                self.num_cuts_left -= 1
                return True
        return False


def _handler(control: ProxyControl) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            path = urlsplit(self.path).path
            control.requests.append({"method": self.command, "path": self.path,
                                     "headers": {k.lower(): v for k, v in self.headers.items()}})
            upstream = http.client.HTTPConnection(control.upstream, timeout=60)
            upstream.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
            for name, value in self.headers.items():
                upstream.putheader(name, value)
            upstream.endheaders(body)
            response = upstream.getresponse()
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() != "transfer-encoding":
                    self.send_header(name, value)
            self.end_headers()
            is_get = self.command == "GET"
            cut = control.cut_after_bytes if is_get and control.take_cut(path) else None
            is_held = is_get and control.hold_key and path.endswith(control.hold_key)
            start = int(self.headers.get("Range", "bytes=0-").removeprefix("bytes=")
                        .split("-")[0] or 0)
            is_slow = is_get and control.slow_key and path.endswith(control.slow_key)
            sent = 0
            while chunk := response.read(64 << 10):
                if is_slow:
                    time.sleep(control.slow_seconds_per_piece)
                if is_held and start + sent + len(chunk) > control.hold_from_byte:
                    num_sent_before = max(control.hold_from_byte - start - sent, 0)
                    self._hold(chunk[:num_sent_before])
                    sent, chunk = sent + num_sent_before, chunk[num_sent_before:]
                if cut is not None and sent + len(chunk) > cut:
                    self.wfile.write(chunk[: cut - sent])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(chunk)
                sent += len(chunk)
            upstream.close()

        def _hold(self, head: bytes) -> None:
            """Send the bytes before the held one, then wait for the test (the same whether
            the reader streams the object at once or in ranges)."""
            self.wfile.write(head)
            self.wfile.flush()
            if not control.release.is_set():
                control.held.set()
                control.release.wait(60)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    return Handler


@contextmanager
def s3_proxy(upstream_url: str) -> Iterator[tuple[str, ProxyControl]]:
    control = ProxyControl(urlsplit(upstream_url).netloc)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(control))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", control
    finally:
        control.release.set()
        server.shutdown()
        server.server_close()
