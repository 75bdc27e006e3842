"""uvicorn, configured as this server needs: the guarded connection protocol, timeouts, TLS, and a
shutdown that ends every open stream with an error record before its grace runs out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import uvicorn
from starlette.applications import Starlette

from handler.connections import ConnectionGuard, connection_cap, guarded_protocol
from handler.settings import ServerSettings

logger = logging.getLogger(__name__)


class Server(uvicorn.Server):
    """Calls `on_grace_expired` shortly before the graceful shutdown's grace runs out, so that
    open streams end with a final error record instead of being cut."""

    def __init__(self, config: uvicorn.Config, on_grace_expired: Callable[[], None]):
        super().__init__(config)
        self.on_grace_expired = on_grace_expired

    async def shutdown(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        grace = self.config.timeout_graceful_shutdown or 0
        margin = min(2.0, grace / 5)
        timer = asyncio.get_running_loop().call_later(grace - margin, self.on_grace_expired)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def build_server(app: Starlette, settings: ServerSettings, port: int | None = None) -> Server:
    """The server for `app` (whose state is a `ServerState`); `port` overrides the settings'."""
    cap = connection_cap(settings.max_connections)
    guard = ConnectionGuard(cap, settings.timeout_request_headers)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port if port is None else port,
        http=guarded_protocol(guard), log_level=settings.log_level, access_log=False,
        timeout_keep_alive=settings.timeout_keep_alive,  # type: ignore[arg-type]
        timeout_graceful_shutdown=settings.graceful_shutdown_seconds,  # type: ignore[arg-type]
        ssl_keyfile=settings.ssl_keyfile, ssl_certfile=settings.ssl_certfile,
        ssl_ca_certs=settings.ssl_ca_certs,
        ssl_cert_reqs=2 if settings.ssl_ca_certs else 0,  # ssl.CERT_REQUIRED with a CA bundle
    )
    state = app.state.server
    state.connection_guard = guard
    logger.info("connections: at most %d open; headers within %.0f s, bodies within %.0f s",
                cap, settings.timeout_request_headers, settings.timeout_request_body)
    return Server(config, lambda: state.cancel_open_requests("the server is shutting down"))
