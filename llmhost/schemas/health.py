"""GET /health and /ready: response schemas."""
from __future__ import annotations

from marshmallow import fields

from ..http.extensions import Schema


class HealthSchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["ok"]})


class FailedModelSchema(Schema):
    model = fields.String(required=True)
    error = fields.String(required=True)


class ReadySchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["ready", "loading"]})
    loaded = fields.List(fields.String(), required=True)
    loading = fields.List(fields.String(), required=True)
    failed = fields.List(fields.Nested(FailedModelSchema), required=True, metadata={
        "description": "LLMHOST_MODELS entries that did not load, and why."})
