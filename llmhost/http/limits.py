"""The request body limit (LLMHOST_MAX_BODY_BYTES): a 413 before anything
parses the body."""
from __future__ import annotations

from flask import Flask, request

from ..config import settings
from .errors import too_large

# Bodies over the limit are read and thrown away up to this size before the 413
# goes out: a server that answers without reading closes the socket on a client
# that is still sending, which sees a connection reset instead of the 413.
DRAIN_LIMIT = 64 * 1024 * 1024


# Room for the other form fields and the multipart framing around an audio file.
FORM_ROOM = 1024 * 1024


def limit_body() -> None:
    """413 before anything parses the body, with the body drained first. Audio
    uploads (/v1/audio/*) may be as large as LLMHOST_MAX_AUDIO_BYTES allows."""
    config = settings()
    limit = config.MAX_BODY_BYTES
    if limit and request.path.startswith("/v1/audio/"):
        limit = max(limit, config.MAX_AUDIO_BYTES + FORM_ROOM)
        request.max_content_length = limit   # werkzeug's multipart parser reads this one
    length = request.content_length
    if not limit or length is None or length <= limit:
        return
    if length <= DRAIN_LIMIT:
        stream = request.environ["wsgi.input"]
        left = length
        while left > 0:
            chunk = stream.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
    raise too_large(limit, length)


def request_body(req) -> bytes:
    """The body, with LLMHOST_MAX_BODY_BYTES enforced for chunked uploads too
    (they have no Content-Length for limit_body to check): werkzeug silently
    cuts a chunked body at the limit (the client then gets "bad JSON"); read
    one byte more and answer 413."""
    limit = req.max_content_length
    if req.content_length is not None or not limit or "wsgi.input_terminated" not in req.environ:
        return req.get_data(cache=True)
    cached = req.environ.get("llmhost.body")
    if cached is None:
        stream = req.environ["wsgi.input"]
        cached = stream.read(limit + 1)
        if len(cached) > limit:
            raise too_large(limit)
        req.environ["llmhost.body"] = cached
    return cached


def init_app(app: Flask) -> None:
    app.before_request(limit_body)
