"""The one error path: everything a client can get wrong, or we can, becomes
an OpenAI error envelope ``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

import logging

from flask import Flask, current_app, jsonify
from werkzeug.exceptions import HTTPException

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


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_supported(param: str, hint: str = "") -> APIError:
    return APIError(400, f"'{param}' is not supported by llmhost{hint}.", param=param,
                    code="unsupported_parameter")


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
        if location in ("json", "query", "form", "headers", "view_args"):
            messages = inner
    path, text = _field_path(messages)
    if path == "":
        return invalid(text)
    if text.startswith("Missing data for required field"):
        return invalid(f"Missing required parameter: '{path}'.", param=path)
    return invalid(f"Invalid value for '{path}': {text.rstrip('.')}.", param=path)


def _render(err: APIError):
    from . import redact   # server paths only for admins (and keyless servers)
    body = err.to_dict()
    body["error"]["message"] = redact.text(err.message)
    response = jsonify(body)
    response.status_code = err.status
    for key, value in err.headers.items():
        response.headers[key] = value
    return response


def handle_api_error(err: APIError):
    return _render(err)


def handle_http_exception(exc: HTTPException):
    data = getattr(exc, "data", None) or {}
    if "messages" in data:
        return _render(from_validation(data["messages"]))
    status = exc.code or 500
    message = exc.description or exc.name
    if status == 404:
        message = "Unknown route. The API lives under /v1 (see /docs)."
    elif status == 413:
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        message = f"Request body is larger than the limit of {limit} bytes (LLMHOST_MAX_BODY_BYTES)."
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
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
