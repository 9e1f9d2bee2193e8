"""Request ids, one log line per request, and log formats.

The request line is written when the response is *closed*, not when the view
returns: a streamed completion is still running then, and its final token
counts are only known at the end. Views and stream generators put what they
know into :func:`log_fields`, and the close callback writes whatever is there.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid

from flask import Flask, Response, has_request_context, request
from gunicorn import glogging

from ..config import settings

log = logging.getLogger("llmhost")
request_log = logging.getLogger("llmhost.request")

ENVIRON_KEY = "llmhost.log"
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
# Order of the fields in a text line; other fields follow in insertion order.
ORDER = ("request_id", "method", "path", "status", "model", "prompt_tokens",
         "completion_tokens", "latency_ms")


def log_fields() -> dict:
    """The current request's log fields, a mutable dict: a route sets
    ``log_fields().update(model=..., prompt_tokens=..., completion_tokens=...)``;
    a stream generator keeps the dict and updates it when the stream ends."""
    if not has_request_context():
        return {}
    fields = request.environ.get(ENVIRON_KEY)
    if fields is None:
        fields = request.environ[ENVIRON_KEY] = {"request_id": uuid.uuid4().hex}
    return fields


def content_logging_enabled() -> bool:
    """Prompt and completion text may be logged only when this is true
    (LLMHOST_LOG_CONTENT=1); otherwise they are private to the caller."""
    if not has_request_context():
        return False
    return bool(settings().LOG_CONTENT)


# -- formatters -----------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines (LLMHOST_LOG_FORMAT=json)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname, "logger": record.name}
        fields = getattr(record, "fields", None)
        if fields:
            out["message"] = "request"
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _text(value) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text


def format_fields(fields: dict) -> str:
    keys = [k for k in ORDER if k in fields] + [k for k in fields if k not in ORDER]
    return " ".join(f"{k}={_text(fields[k])}" for k in keys if fields[k] is not None)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def init_logging(config) -> None:
    """One stderr handler on the root logger (replaced, not stacked, when the app
    is created again) in the configured format."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_llmhost", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._llmhost = True  # type: ignore[attr-defined]
    handler.setFormatter(formatter(config.LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(config.LOG_LEVEL.upper())


class GunicornLogger(glogging.Logger):
    """gunicorn's own lines (boot, workers, access log) as JSON too: its
    logger_class when LLMHOST_LOG_FORMAT=json."""

    def setup(self, cfg):
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                handler.setFormatter(JsonFormatter())


# -- per request --------------------------------------------------------------

def _start() -> None:
    incoming = request.headers.get("X-Request-Id", "")
    fields = log_fields()
    if REQUEST_ID.match(incoming):
        fields["request_id"] = incoming
    fields.update(method=request.method, path=request.path)
    request.environ["llmhost.started"] = time.perf_counter()


def _finish(response: Response) -> Response:
    fields = log_fields()
    response.headers["X-Request-Id"] = fields["request_id"]
    fields["status"] = response.status_code
    if "model" not in fields and request.view_args and request.view_args.get("model_id"):
        fields["model"] = request.view_args["model_id"]
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    started = request.environ.get("llmhost.started", time.perf_counter())
    response.call_on_close(lambda: _write(fields, route, started))
    return response


def _write(fields: dict, route: str, started: float) -> None:
    from ..engine import metrics

    seconds = time.perf_counter() - started
    fields["latency_ms"] = round(seconds * 1000, 1)
    metrics.observe_request(route, fields.get("method", ""), fields.get("status", 0), seconds)
    request_log.info("%s", format_fields(fields), extra={"fields": fields})


def init_app(app: Flask, config) -> None:
    init_logging(config)
    app.before_request(_start)
    app.after_request(_finish)
