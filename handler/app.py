"""The Starlette application: routes, error handling, and the model load at startup."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine import EngineConfig, EngineProcessClient
from handler import routes
from handler.protocol import ApiError
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
        yield
        state.shutdown()

    app = Starlette(
        routes=[
            Route("/ping", routes.ping, methods=["GET", "POST"]),
            Route("/health", routes.health, methods=["GET"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
            Route("/invocations", routes.invocations, methods=["POST"]),
            Route("/v1/completions", routes.completions, methods=["POST"]),
            Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", routes.model_info, methods=["GET"]),
            Route("/", routes.tgi_root, methods=["POST"]),
            Route("/generate", routes.tgi_generate, methods=["POST"]),
            Route("/generate_stream", routes.tgi_generate_stream, methods=["POST"]),
            Route("/info", routes.info, methods=["GET"]),
            Route("/openapi.json", routes.openapi, methods=["GET"]),
            Route("/endpoints/{name}/invocations", routes.runtime_invocations,
                  methods=["POST"]),
            Route("/endpoints/{name}/invocations-response-stream",
                  routes.runtime_invocations_stream, methods=["POST"]),
        ],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                            ClientDisconnect: _client_gone, Exception: _unexpected_error},
        lifespan=lifespan,
    )
    app.state.server = state
    return app


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return routes.error_response(exc, request.url.path)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and methods answer in the same JSON shape as every other error."""
    assert isinstance(exc, HTTPException)
    return routes.error_response(ApiError(exc.status_code, f"{exc.detail}: {request.method} "
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
