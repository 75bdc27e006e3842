"""One rule for every request shape and route: whether to stream is the body's `stream` (or the
runtime's `-response-stream` route); the format is `Accept`'s.

| Accept | plain answer | streamed answer |
|---|---|---|
| absent, `*/*`, `application/*` | JSON | server-sent events |
| `application/json` | JSON | JSON lines (as LMI does) |
| `text/event-stream` | 406 | server-sent events |
| `application/jsonlines`, `application/jsonl`, `application/x-ndjson` | 406 | JSON lines |
| anything else | 406 | 406 |

One exception, the routes of an API whose streams are always SSE: on OpenAI's `/v1/...` and on
TGI's own `/` and `/generate_stream`, a streamed `application/json` answer is server-sent events
(the OpenAI SDK sends `Accept: application/json` and parses SSE).
"""

from __future__ import annotations

import enum

from handler.protocol import ApiError

JSONLINES_TYPES = ("application/jsonlines", "application/jsonl", "application/x-ndjson")


class StreamFormat(enum.Enum):
    JSON = "application/json"
    SSE = "text/event-stream"
    JSONLINES = "application/jsonlines"

    @property
    def media_type(self) -> str:
        return self.value


def _media_ranges(accept: str) -> list[str]:
    """The media ranges of an Accept header, most preferred first (q=0 ones dropped)."""
    ranges = []
    for position, item in enumerate(accept.split(",")):
        media, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media and quality > 0:
            ranges.append((-quality, position, media.lower()))
    return [media for _, _, media in sorted(ranges)]


def _format_of(media: str, is_stream: bool, is_sse_route: bool) -> StreamFormat | None:
    if media in ("*/*", "application/*"):
        return StreamFormat.SSE if is_stream else StreamFormat.JSON
    if media == "application/json":
        if not is_stream:
            return StreamFormat.JSON
        return StreamFormat.SSE if is_sse_route else StreamFormat.JSONLINES
    if is_stream and media in (StreamFormat.SSE.value, "text/*"):
        return StreamFormat.SSE
    if is_stream and media in JSONLINES_TYPES:
        return StreamFormat.JSONLINES
    return None


def choose_format(accept: str, is_stream: bool, is_sse_route: bool = False) -> StreamFormat:
    """The answer's format, or a 406 naming what can be produced."""
    if not accept.strip():
        return StreamFormat.SSE if is_stream else StreamFormat.JSON
    for media in _media_ranges(accept):
        chosen = _format_of(media, is_stream, is_sse_route)
        if chosen is not None:
            return chosen
    can = ("text/event-stream, application/jsonlines or application/json" if is_stream
           else "application/json")
    raise ApiError(406, f"cannot answer in {accept!r}: this request can be answered in {can}",
                   "Accept")
