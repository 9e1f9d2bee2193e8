"""GET /health and /ready: response schemas."""
from __future__ import annotations

from marshmallow import fields

from ..http.extensions import Schema


class HealthSchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["ok"]})


class FailedModelSchema(Schema):
    model = fields.String(required=True)
    error = fields.String(required=True)


class ReadyQuerySchema(Schema):
    model = fields.String(metadata={"description": "Ready for this model only: 200 once it is "
                                                   "loaded and serving, 503 (Retry-After) while "
                                                   "it loads, 404 when this server does not have it."})


class ReadySchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["ready", "loading", "absent", "unavailable"]})
    message = fields.String(metadata={"description": "Why it is not ready, when it is not the "
                                                     "models (the store's schema is behind)."})
    loaded = fields.List(fields.String(), required=True)
    loading = fields.List(fields.String(), required=True)
    failed = fields.List(fields.Nested(FailedModelSchema), required=True, metadata={
        "description": "LLMHOST_MODELS entries that did not load, and why."})
