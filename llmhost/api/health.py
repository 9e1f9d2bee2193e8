"""Probes for load balancers and Kubernetes, and Prometheus metrics. All open:
they need no API key and say nothing about requests' content."""
import logging

from flask import Response, current_app

from ..config import settings
from ..engine.errors import Refused
from ..engine import metrics
from ..http import redact
from ..http.extensions import Blueprint
from ..models.registry import registry
from ..schemas.health import HealthSchema, ReadyQuerySchema, ReadySchema
from ..store import responses as store

log = logging.getLogger("llmhost")

blp = Blueprint("health", __name__, description="Liveness and readiness probes, metrics.")

OPEN = {"security": []}


@blp.route("/health", methods=["GET"])
@blp.doc(**OPEN)
@blp.response(200, HealthSchema)
def health():
    """Liveness: 200 while the process serves"""
    return {"status": "ok"}


@blp.route("/ready", methods=["GET"])
@blp.doc(**OPEN)
@blp.arguments(ReadyQuerySchema, location="query")
@blp.response(200, ReadySchema, description="Every LLMHOST_MODELS entry was tried (with "
              "`model`: that model is loaded and serving).")
@blp.alt_response(503, schema=ReadySchema, description="Still preloading (that model), or the "
                  "response store's schema is behind (`llmhost db upgrade`); Retry-After.")
@blp.alt_response(404, schema=ReadySchema, description="`model` is neither loaded nor loading.")
def ready(query):
    """Readiness: 503 until the preloaded models are loaded

    Entries of LLMHOST_MODELS that failed are listed under `failed`; the server
    is ready with the rest. `?model=ID` asks for one model (what a router's
    per-model health check reads).
    """
    status = current_app.extensions["llmhost_preload"].status()
    model = query.get("model")
    if model is not None:
        status["status"] = ("ready" if registry.find(model) is not None
                            else "loading" if registry.coming(model) else "absent")
    status["loaded"] = [redact.model_id(m) for m in status["loaded"]]
    status["loading"] = [redact.model_id(m) for m in status["loading"]]
    status["failed"] = [{"model": redact.model_id(f["model"]), "error": redact.text(f["error"])}
                        for f in status["failed"]]
    behind = _store_behind()
    if behind:
        status.update(status="unavailable", message=behind)
    code = {"ready": 200, "absent": 404}.get(status["status"], 503)
    return status, code, {"Retry-After": "5"} if code == 503 else {}


def _store_behind() -> str | None:
    """A shared store (LLMHOST_DATABASE_URL) whose schema is older than this llmhost."""
    if not settings().DATABASE_URL:
        return None
    try:
        store.current().check()
    except store.StoreBehind as exc:
        return exc.message
    except Refused as exc:       # unreachable now: chat still serves, so still ready
        log.warning("readiness: %s", exc.message)
    return None


@blp.route("/metrics", methods=["GET"])
@blp.doc(**OPEN, responses={"200": {
    "description": "Prometheus text exposition format.",
    "content": {"text/plain": {"schema": {"type": "string"}}}}})
def prometheus():
    """Prometheus metrics (text format)"""
    body, content_type = metrics.exposition()
    if not redact.may_see_paths():   # models loaded by path are labelled with their path
        body = redact.text(body.decode(), force=True).encode()
    return Response(body, content_type=content_type)
