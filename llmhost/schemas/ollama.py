"""Ollama's API (/api/*): request schemas. Messages, options, format and tools
are checked where they are translated (generation/ollama.py) and then by the
chat route's own schema."""
from __future__ import annotations

from marshmallow import fields, validate

from ..http.extensions import Schema

MODEL = {"description": "Id (or alias) of a model (see /api/tags)."}


class _Generation(Schema):
    model = fields.String(required=True, validate=validate.Length(min=1), metadata=MODEL)
    format = fields.Raw(allow_none=True, metadata={
        "description": "`\"json\"` or a JSON schema the answer must follow (a grammar)."})
    options = fields.Dict(allow_none=True, metadata={
        "description": "temperature, top_p, top_k, min_p, num_predict, stop, seed, "
                       "repeat_penalty, presence_penalty, frequency_penalty; others ignored."})
    stream = fields.Boolean(load_default=True, metadata={
        "description": "NDJSON chunks (the default), or one object with `false`."})
    keep_alive = fields.Raw(allow_none=True, metadata={"description": "Accepted and ignored."})
    think = fields.Raw(allow_none=True, metadata={
        "description": "`false` renders templates with an enable_thinking switch with "
                       "thinking off."})


class ChatSchema(_Generation):
    messages = fields.List(fields.Raw(), required=True, validate=validate.Length(min=1))
    tools = fields.List(fields.Raw(), allow_none=True, metadata={
        "description": "Functions as in OpenAI's chat API."})
    tool_choice = fields.Raw(allow_none=True, metadata={
        "description": "llmhost extra (Ollama has none): OpenAI's `tool_choice`; `required` or "
                       "a named function forces a call with a grammar."})


class GenerateSchema(_Generation):
    prompt = fields.String(load_default="", metadata={
        "description": "Rendered as a user turn with the model's chat template; empty: only "
                       "check that the model is loaded (`done_reason: load`)."})
    system = fields.String(allow_none=True)
    suffix = fields.String(allow_none=True, metadata={"description": "Not supported."})
    template = fields.String(allow_none=True, metadata={"description": "Not supported."})
    context = fields.List(fields.Integer(), allow_none=True, metadata={
        "description": "Not supported."})
    raw = fields.Boolean(allow_none=True, metadata={"description": "Not supported."})
    images = fields.List(fields.String(), allow_none=True, metadata={
        "description": "Not supported (text models)."})


class EmbedSchema(Schema):
    model = fields.String(required=True, validate=validate.Length(min=1), metadata=MODEL)
    input = fields.Raw(required=True, metadata={"description": "A string or a list of strings."})
    truncate = fields.Boolean(load_default=True, metadata={
        "description": "Cut inputs longer than the model's context (default true, as Ollama)."})
    dimensions = fields.Integer(strict=True, allow_none=True, validate=validate.Range(min=1))
    options = fields.Dict(allow_none=True, metadata={"description": "Accepted and ignored."})
    keep_alive = fields.Raw(allow_none=True, metadata={"description": "Accepted and ignored."})


class EmbeddingsSchema(Schema):
    model = fields.String(required=True, validate=validate.Length(min=1), metadata=MODEL)
    prompt = fields.String(required=True)
    options = fields.Dict(allow_none=True, metadata={"description": "Accepted and ignored."})
    keep_alive = fields.Raw(allow_none=True, metadata={"description": "Accepted and ignored."})


class ModelNameSchema(Schema):
    model = fields.String(required=True, validate=validate.Length(min=1), metadata=MODEL)


class PullSchema(Schema):
    model = fields.String(required=True, validate=validate.Length(min=1, max=4096), metadata={
        "description": "What POST /v1/models loads: a hub id, a local folder or a .gguf file."})
    insecure = fields.Boolean(allow_none=True, metadata={"description": "Accepted and ignored."})
    stream = fields.Boolean(load_default=True, metadata={
        "description": "Status lines while it loads (the default), or one object."})


class StatusSchema(Schema):
    status = fields.String()
    digest = fields.String()
    total = fields.Integer()
    completed = fields.Integer()
