"""The Starlette application: routes, error handling, and the model load at startup."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine import EngineConfig, EngineProcessClient
from handler import probes
from handler.errors import ApiError, error_response
from handler.settings import ServerSettings
from handler.state import ServerState

logger = logging.getLogger(__name__)


def build_app(settings: ServerSettings, engine_config: EngineConfig,
              loader: EngineProcessClient | None = None) -> Starlette:
    """`loader`: the engine's process, already started by the entry."""
    state = ServerState(settings, engine_config, loader)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.start()
        # The routes that take requests, imported while /ping already answers.
        threading.Thread(target=_import_routes, name="import-routes", daemon=True).start()
        yield
        state.shutdown()

    app = Starlette(
        routes=[
            Route("/ping", probes.ping, methods=["GET", "POST"]),
            Route("/health", probes.health, methods=["GET"]),
            Route("/metrics", probes.metrics, methods=["GET"]),
            Route("/invocations", _deferred("invocations"), methods=["POST"]),
            Route("/v1/completions", _deferred("completions"), methods=["POST"]),
            Route("/v1/chat/completions", _deferred("chat_completions"), methods=["POST"]),
            Route("/v1/models", _deferred("models"), methods=["GET"]),
            Route("/v1/models/{model_id:path}", _deferred("model_info"), methods=["GET"]),
            Route("/", _deferred("tgi_root"), methods=["POST"]),
            Route("/generate", _deferred("tgi_generate"), methods=["POST"]),
            Route("/generate_stream", _deferred("tgi_generate_stream"), methods=["POST"]),
            Route("/info", _deferred("info"), methods=["GET"]),
            Route("/openapi.json", _deferred("openapi"), methods=["GET"]),
            Route("/endpoints/{name}/invocations", _deferred("runtime_invocations"),
                  methods=["POST"]),
            Route("/endpoints/{name}/invocations-response-stream",
                  _deferred("runtime_invocations_stream"), methods=["POST"]),
        ],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                            ClientDisconnect: _client_gone, Exception: _unexpected_error},
        lifespan=lifespan,
    )
    app.state.server = state
    return app


def _import_routes() -> None:
    """`handler.routes` on a thread of its own, the GIL handed back every 0.2 ms meanwhile: at
    the default 5 ms a /ping, which takes the GIL back after each of its ~10 system calls,
    waited up to 5 ms each time and answered in 76-124 ms while pydantic built its models."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    try:
        _routes_module()
    finally:
        sys.setswitchinterval(interval)


_routes: ModuleType | None = None  # `handler.routes` once wholly imported


def _routes_module() -> ModuleType:
    global _routes
    _routes = importlib.import_module("handler.routes")  # waits for another thread's import
    return _routes


def _deferred(name: str) -> Callable[[Request], Awaitable[Response]]:
    """The route `handler.routes.<name>`, imported when first asked for. The server then
    listens before pydantic and the request protocol are imported (0.11 s of a 0.4 s first /ping
    on Zen 3, 0.2 s of 0.6 s on Zen 1); the lifespan imports them in the background meanwhile."""

    async def endpoint(request: Request) -> Response:
        # Still importing (the first requests of a start): waited for off the event loop, so
        # /ping keeps answering meanwhile.
        routes = _routes or await asyncio.to_thread(_routes_module)
        return await getattr(routes, name)(request)

    endpoint.__name__ = name
    return endpoint


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc, request.url.path)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and methods answer in the same JSON shape as every other error."""
    assert isinstance(exc, HTTPException)
    return error_response(ApiError(exc.status_code, f"{exc.detail}: {request.method} "
                                   f"{request.url.path}", headers=exc.headers),
                          request.url.path)


async def _client_gone(request: Request, exc: Exception) -> Response:
    logger.info("%s %s: the client disconnected", request.method, request.url.path)
    return Response(status_code=499)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    logger.exception("unexpected error on %s", request.url.path)
    return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}",
                                   "type": "InternalServerError", "code": 500}},
                        status_code=500)
