"""Server-sent events framing (and NDJSON lines, Ollama's streams), and
telling whether the client of a request is still there.

Every event is ``data: <json>\\n\\n`` and a stream always ends with
``data: [DONE]\\n\\n``. Once the 200 and the first bytes are out, an error can
no longer be an HTTP status, so it goes out as an event holding the usual
error envelope, followed by ``[DONE]``.
"""
from __future__ import annotations

import json
import logging
import socket
from typing import Iterable, Iterator

from flask import Response, current_app

from . import redact
from .errors import APIError, as_api_error, envelope, shape

log = logging.getLogger("llmhost")

DONE = "data: [DONE]\n\n"
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",      # nginx: pass each event through at once
}


def event(data: dict, name: str | None = None) -> str:
    """One event; with `name`, an `event:` line first (the Responses API names
    each event after its `type`, and clients dispatch on it)."""
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def ndjson_line(data: dict, name: str | None = None) -> str:
    """One line of a newline-delimited JSON stream (Ollama's)."""
    return json.dumps(data, ensure_ascii=False, separators=(',', ':')) + "\n"


def _events(chunks: Iterator[dict], debug: bool, named: bool = False,
            done: bool = True, hide_paths: bool = False, kind: str = "openai",
            frame=event) -> Iterator[str]:
    """The stream's events. However it ends (done, an error, or the server
    closing this generator because the client went away), the source is closed
    once, in `finally`: its cleanup cancels the generation. With `named`, an
    error is an `error` event. `hide_paths`: the caller sees no server paths
    (decided by stream() while the request is still on); `kind`: the error
    envelope's API (errors.shape()); `frame`: SSE events or NDJSON lines."""
    try:
        for chunk in chunks:
            yield frame(chunk, chunk.get("type") if named else None)
    except Exception as exc:
        err = as_api_error(exc)
        if err is None:
            log.exception("error in a stream after it started")
            message = "The server had an error while processing your request."
            if debug:
                message += f" ({type(exc).__name__}: {exc})"
            err = APIError(500, message, type="server_error")
        err.message = redact.text(err.message, force=hide_paths)
        yield frame(envelope(err, kind), "error" if named else None)
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    if done:
        yield DONE


def stream(chunks: Iterable[dict], named: bool = False, done: bool = True) -> Response:
    """A text/event-stream response of `chunks` (dicts), then [DONE]. With
    `named`, each event carries an `event:` line equal to the chunk's `type`;
    `done=False` leaves out [DONE] (the Responses API ends on its own
    `response.completed` event instead)."""
    iterator = iter(chunks)
    return Response(_events(iterator, current_app.debug, named, done,
                            hide_paths=not redact.may_see_paths(), kind=shape()),
                    mimetype="text/event-stream", headers=HEADERS)


def ndjson(chunks: Iterable[dict]) -> Response:
    """An application/x-ndjson response of `chunks`, one JSON object a line
    (Ollama's streams); an error after the start is a last ``{"error": ...}``
    line, as Ollama sends it."""
    return Response(_events(iter(chunks), current_app.debug, done=False,
                            hide_paths=not redact.may_see_paths(), kind=shape(),
                            frame=ndjson_line),
                    mimetype="application/x-ndjson", headers=HEADERS)


def client_disconnected(environ: dict) -> bool:
    """True when the client of this request closed its connection.

    Under gunicorn the socket is in the environ; a peer that closed reads as
    end-of-file (b"") when peeking, without consuming anything. With no socket
    (development server, test client) we cannot tell, and say False."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False                 # nothing to read: still connected
    except (OSError, ValueError):
        return True                  # reset, or already closed on our side
