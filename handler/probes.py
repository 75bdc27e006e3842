"""The routes that answer while the rest of the server still imports: /ping (SageMaker's health
check), /health (TGI's) and /metrics. They need neither pydantic nor the request protocol, so the
server listens before those are imported (handler/app.py)."""

from __future__ import annotations

from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from handler.state import ServerState


def server_state(request: Request) -> ServerState:
    return request.app.state.server


async def ping(request: Request) -> Response:
    status, body = server_state(request).health()
    return JSONResponse(body, status_code=status)


async def health(request: Request) -> Response:
    status, _ = server_state(request).health()
    return Response(status_code=200 if status == 200 else 503)


async def metrics(request: Request) -> Response:
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(server_state(request).metrics.registry), media_type=content_type)
