"""The errors the server answers as JSON: `ApiError` and its response, in OpenAI's shape or,
on TGI's own routes, in TGI's. Light (starlette only): the app's exception handlers need it
before the request protocol is imported."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


class ApiError(Exception):
    """An error answered to the client as JSON with this status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = headers or {}


ERROR_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
    405: "MethodNotAllowed", 406: "NotAcceptableError", 408: "RequestTimeoutError",
    413: "RequestTooLargeError", 415: "UnsupportedMediaTypeError", 422: "ValidationError",
    429: "OverloadedError", 499: "ClientClosedRequest", 503: "ServiceUnavailableError",
}


# TGI's own routes answer errors in TGI's shape: {"error": message, "error_type": kind}.
TGI_PATHS = ("/", "/generate", "/generate_stream")
TGI_ERROR_TYPES = {422: "validation", 400: "validation", 429: "overloaded", 413: "validation"}


def error_response(error: ApiError, path: str = "") -> JSONResponse:
    if path in TGI_PATHS:
        body: dict[str, Any] = {"error": error.message,
                                "error_type": TGI_ERROR_TYPES.get(error.status, "generation")}
    else:
        body = {"error": {"message": error.message,
                          "type": ERROR_TYPES.get(error.status, "InternalServerError"),
                          "param": error.param, "code": error.status}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)
