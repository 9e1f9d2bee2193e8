"""Probes for load balancers and Kubernetes, and Prometheus metrics. All open:
they need no API key and say nothing about requests' content."""
from flask import Response, current_app

from ..engine import metrics
from ..http import redact
from ..http.extensions import Blueprint
from ..schemas.health import HealthSchema, ReadySchema

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
@blp.response(200, ReadySchema, description="Every LLMHOST_MODELS entry was tried.")
@blp.alt_response(503, schema=ReadySchema, description="Still preloading LLMHOST_MODELS.")
def ready():
    """Readiness: 503 until the preloaded models are loaded

    Entries of LLMHOST_MODELS that failed are listed under `failed`; the server
    is ready with the rest.
    """
    status = current_app.extensions["llmhost_preload"].status()
    status["loaded"] = [redact.model_id(m) for m in status["loaded"]]
    status["loading"] = [redact.model_id(m) for m in status["loading"]]
    status["failed"] = [{"model": redact.model_id(f["model"]), "error": redact.text(f["error"])}
                        for f in status["failed"]]
    return status, 200 if status["status"] == "ready" else 503


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
