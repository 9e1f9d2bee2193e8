"""The one error path: everything a client can get wrong, or we can, becomes
an error envelope in the shape of the API the route belongs to (:func:`shape`):
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` by default,
Anthropic's ``{"type": "error", "error": {"type", "message"}}`` on the
Messages API, Ollama's ``{"error": "message"}`` on /api/*."""
from __future__ import annotations

import logging

from flask import Flask, current_app, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException

from . import redact
from ..engine import errors as engine

log = logging.getLogger("llmhost")

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered to the client as an OpenAI envelope."""

    def __init__(self, status: int, message: str, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


# Anthropic's error types by status (its SDK raises a typed exception per status).
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                   429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}
# The blueprints (api/MODULES) whose routes answer in another API's shape.
SHAPES = {"anthropic": "anthropic", "ollama": "ollama"}


def shape() -> str:
    """The error shape of the current request's route: 'openai', 'anthropic'
    or 'ollama' (decided while the request is on; streams keep it)."""
    if not has_request_context():
        return "openai"
    return SHAPES.get(request.blueprint or "", "openai")


def envelope(err: APIError, kind: str = "openai") -> dict:
    """`err` as the body of the `kind` API."""
    if kind == "anthropic":
        fallback = "api_error" if err.status >= 500 else "invalid_request_error"
        return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(err.status, fallback),
                                           "message": err.message}}
    if kind == "ollama":
        return {"error": err.message}
    return err.to_dict()


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def too_large(limit: int, length: int | None = None) -> APIError:
    """413 for a body over LLMHOST_MAX_BODY_BYTES (the size, when known)."""
    size = f" of {length} bytes" if length is not None else ""
    return APIError(413, f"Request body{size} is larger than the limit of {limit} bytes "
                         "(LLMHOST_MAX_BODY_BYTES).", code="request_too_large")


def not_supported(param: str, hint: str = "") -> APIError:
    return from_engine(engine.unsupported(param, hint))


# Each kind of refusal (engine/errors.py): its status and, where not the
# status's own, its error type.
REFUSED = ((engine.InvalidInput, 400, None), (engine.NotPermitted, 403, None),
           (engine.NotFound, 404, None), (engine.Conflict, 409, None),
           (engine.Unavailable, 503, None), (engine.NoRoom, 507, "insufficient_memory"),
           (engine.ServerFailure, 500, None))


def from_engine(exc: engine.EngineError) -> APIError:
    """The one place a domain error becomes a status, a message and its hint."""
    if isinstance(exc, engine.Refused):
        status, type_ = next(((s, t) for kind, s, t in REFUSED if isinstance(exc, kind)),
                             (400, None))
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return APIError(status, exc.message, type=type_, param=exc.param, code=exc.code,
                        headers=headers)
    if isinstance(exc, engine.QueueFull):
        return APIError(429, f"The model '{exc.model_id}' has {exc.waiting} requests waiting "
                             "(LLMHOST_MAX_QUEUE); retry shortly.",
                        code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, engine.QueueTimeout):
        return APIError(503, f"The request waited more than {exc.seconds:g} s for "
                             f"'{exc.model_id}' (LLMHOST_QUEUE_TIMEOUT); retry later.",
                        code="queue_timeout", headers={"Retry-After": "5"})
    if isinstance(exc, engine.ModelClosed):
        return APIError(503, exc.reason, code="model_unloaded")
    if isinstance(exc, engine.EngineOutOfMemory):
        return APIError(503, f"Out of memory while {exc.doing} on '{exc.model_id}'; retry with "
                             f"{exc.hint}.", code="out_of_memory")
    if isinstance(exc, engine.EngineFailure):
        return APIError(500, f"The server had an error while {exc.doing}: {exc.cause}. "
                             "Please retry.", type="server_error")
    return APIError(500, "The server had an error while processing your request.",
                    type="server_error")


def as_api_error(exc: Exception) -> APIError | None:
    """`exc` as the error the client gets, when it is one of ours."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, engine.EngineError):
        return from_engine(exc)
    return None


def _field_path(messages, prefix: str = "") -> tuple[str, str]:
    """First (path, message) of a marshmallow error dict, path as OpenAI writes it:
    ``messages[0].content``."""
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key == "_schema":
                return _field_path(value, prefix)
            if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
                path = f"{prefix}[{key}]"
            else:
                path = f"{prefix}.{key}" if prefix else str(key)
            return _field_path(value, path)
    if isinstance(messages, list) and messages:
        if all(isinstance(m, str) for m in messages):
            return prefix, " ".join(messages)
        return _field_path(messages[0], prefix)
    return prefix, str(messages)


def from_validation(messages) -> APIError:
    """webargs puts errors under their location ({'json': {...}}); drop that level."""
    if isinstance(messages, dict) and len(messages) == 1:
        (location, inner), = messages.items()
        if location in ("json", "query", "form", "files", "headers", "view_args"):
            messages = inner
    path, text = _field_path(messages)
    if path == "":
        return invalid(text)
    if text.startswith("Missing data for required field"):
        return invalid(f"Missing required parameter: '{path}'.", param=path)
    return invalid(f"Invalid value for '{path}': {text.rstrip('.')}.", param=path)


def _render(err: APIError):
    err.message = redact.text(err.message)   # server paths only for admins (and keyless servers)
    response = jsonify(envelope(err, shape()))
    response.status_code = err.status
    for key, value in err.headers.items():
        response.headers[key] = value
    return response


def handle_api_error(err: APIError):
    return _render(err)


def handle_engine_error(exc: engine.EngineError):
    return _render(from_engine(exc))


def handle_http_exception(exc: HTTPException):
    data = getattr(exc, "data", None) or {}
    if "messages" in data:
        return _render(from_validation(data["messages"]))
    status = exc.code or 500
    message = exc.description or exc.name
    if status == 404:
        message = "Unknown route. The API lives under /v1 (see /docs)."
    elif status == 413:
        return _render(too_large(current_app.config.get("MAX_CONTENT_LENGTH")))
    elif status == 405:
        message = f"Method not allowed on this route. {exc.description}"
    err = APIError(status, message)
    headers = dict(exc.get_headers())
    headers.pop("Content-Type", None)
    err.headers = {k: v for k, v in headers.items() if k.lower() == "allow"}
    return _render(err)


def handle_unexpected(exc: Exception):
    if isinstance(exc, HTTPException):
        return handle_http_exception(exc)
    log.exception("unhandled error")
    message = "The server had an error while processing your request."
    if current_app.debug:
        message += f" ({type(exc).__name__}: {exc})"
    return _render(APIError(500, message, type="server_error"))


def init_app(app: Flask) -> None:
    app.register_error_handler(APIError, handle_api_error)
    app.register_error_handler(engine.EngineError, handle_engine_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
