"""GET /v1/usage: query and response schemas."""
from __future__ import annotations

from marshmallow import fields, validate

from ..http.extensions import Schema

GROUPS = ("key", "model", "endpoint", "hour", "day")


class UsageQuerySchema(Schema):
    key = fields.String(metadata={"description": "Only this key's usage, by its name (admins)."})
    model = fields.String(metadata={"description": "Only this model."})
    endpoint = fields.String(metadata={"description": "Only this route, e.g. "
                                                      "`/v1/chat/completions`."})
    start_time = fields.Float(validate=validate.Range(min=0), metadata={
        "description": "Unix seconds; usage from the hour that holds it on."})
    end_time = fields.Float(validate=validate.Range(min=0), metadata={
        "description": "Unix seconds; usage before it."})
    group_by = fields.String(load_default="key,model,endpoint,hour", metadata={
        "description": "Sum over everything not named here: any of key, model, endpoint, hour, "
                       "day, separated by commas."})


class UsageBucketSchema(Schema):
    key = fields.String(metadata={"description": "The key's name, or `sha256:` and the start of "
                                                 "its digest; never the key."})
    model = fields.String()
    endpoint = fields.String()
    start_time = fields.Integer(metadata={"description": "Start of the hour or day (unix s)."})
    requests = fields.Integer(required=True)
    prompt_tokens = fields.Integer(required=True)
    cached_tokens = fields.Integer(required=True)
    completion_tokens = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)
    errors = fields.Integer(required=True)


class UsageListSchema(Schema):
    object = fields.String(required=True, metadata={"enum": ["list"]})
    data = fields.List(fields.Nested(UsageBucketSchema), required=True)
