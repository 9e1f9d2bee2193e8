"""POST /v1/chat/completions: request and response schemas."""
from __future__ import annotations

from marshmallow import ValidationError, fields, validate, validates, validates_schema

from ..extensions import Schema
from ..config import settings
from .generation import GenerationSchema, _int, refuse

ROLES = ("system", "developer", "user", "assistant", "tool")


class Content(fields.Field):
    """`content`: a string or an array of `{"type": "text", "text": ...}` parts.
    Errors name the part: ``messages[0].content[1].type``."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValidationError("must be a string or an array of content parts")
        errors: dict = {}
        for i, part in enumerate(value):
            if not isinstance(part, dict):
                errors[i] = ["must be an object like {\"type\": \"text\", \"text\": \"...\"}"]
            elif part.get("type") != "text":
                kind = part.get("type")
                errors[i] = {"type": [f"this server's models take text only; content parts of "
                                      f"type {kind!r} are not supported (use type 'text')"]}
            elif not isinstance(part.get("text"), str):
                errors[i] = {"text": ["must be a string"]}
        if errors:
            raise ValidationError(errors)
        return [{"type": "text", "text": part["text"]} for part in value]


class MessageSchema(Schema):
    role = fields.String(required=True, validate=validate.OneOf(
        ROLES, error="must be one of system, developer, user, assistant, tool"))
    content = Content(allow_none=True, metadata={
        "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}],
        "description": "A string, or an array of text parts."})
    name = fields.String(allow_none=True, metadata={"description": "Passed to the chat template."})
    tool_call_id = fields.String(allow_none=True)
    tool_calls = fields.Raw(allow_none=True, metadata={"description": "Accepted and ignored."})

    @validates_schema
    def _content_required(self, data, **kwargs):
        # Only an assistant turn (one that called tools) may come without content.
        if data.get("content") is None and data.get("role") != "assistant":
            raise ValidationError("Missing data for required field.", "content")


class ResponseFormatSchema(Schema):
    type = fields.String(required=True, metadata={"enum": ["text"]})


class ChatCompletionRequestSchema(GenerationSchema):
    messages = fields.List(fields.Nested(MessageSchema), required=True, metadata={
        "description": "The conversation, rendered with the model's chat template."})
    max_completion_tokens = _int(validate=validate.Range(min=1), metadata={
        "description": "Same as max_tokens (OpenAI's newer name); wins when both are given."})
    logprobs = fields.Boolean(allow_none=True, metadata={
        "description": "Return the log probability of each generated token."})
    top_logprobs = _int(validate=validate.Range(0, 20), metadata={
        "description": "0..20 most likely alternatives per token; needs `logprobs: true`."})
    response_format = fields.Nested(ResponseFormatSchema, allow_none=True, metadata={
        "description": "Only `{\"type\": \"text\"}`; structured output is a 400 for now."})
    metadata = fields.Dict(allow_none=True, metadata={"description": "Accepted and ignored."})
    store = fields.Boolean(allow_none=True, metadata={"description": "Accepted and ignored."})
    parallel_tool_calls = fields.Boolean(allow_none=True, metadata={
        "description": "Accepted and ignored."})
    tools = fields.List(fields.Dict(), allow_none=True, metadata={
        "description": "Not supported yet: a non-empty list is a 400."})
    tool_choice = fields.Raw(allow_none=True, metadata={
        "description": "Not supported yet: anything but `none` is a 400."})

    @validates("messages")
    def _check_messages(self, value, **kwargs):
        if not value:
            raise ValidationError("must contain at least one message")
        limit = settings().MAX_MESSAGES
        if limit and len(value) > limit:
            raise ValidationError(f"at most {limit} messages are allowed on this server "
                                  "(LLMHOST_MAX_MESSAGES)")

    @validates_schema(pass_original=True)
    def _check_combinations(self, data, original, **kwargs):
        if data.get("top_logprobs") is not None and not data.get("logprobs"):
            raise ValidationError("requires 'logprobs': true", "top_logprobs")
        structured = " (only {\"type\": \"text\"}; structured output is not implemented yet)"
        tools = " (tool calling is not implemented yet)"
        if (data.get("response_format") or {}).get("type", "text") != "text":
            refuse(original, "response_format", hint=structured)
        refuse(original, "tools", (None, []), tools)
        refuse(original, "tool_choice", (None, "none"), tools)
        refuse(original, "functions", (None, []), tools)
        refuse(original, "function_call", (None, "none"), tools)


# -- responses (documentation; bodies are built in llmhost/api/chat.py) --------

class TopLogprobSchema(Schema):
    token = fields.String(required=True)
    logprob = fields.Float(required=True)
    bytes = fields.List(fields.Integer(), allow_none=True, required=True)


class TokenLogprobSchema(TopLogprobSchema):
    top_logprobs = fields.List(fields.Nested(TopLogprobSchema), required=True)


class ChoiceLogprobsSchema(Schema):
    content = fields.List(fields.Nested(TokenLogprobSchema), allow_none=True, required=True)
    refusal = fields.Raw(allow_none=True, required=True)


class AssistantMessageSchema(Schema):
    role = fields.String(required=True, metadata={"enum": ["assistant"]})
    content = fields.String(allow_none=True, required=True)
    refusal = fields.String(allow_none=True, required=True)


class ChatChoiceSchema(Schema):
    index = fields.Integer(required=True)
    message = fields.Nested(AssistantMessageSchema, required=True)
    logprobs = fields.Nested(ChoiceLogprobsSchema, allow_none=True, required=True)
    finish_reason = fields.String(required=True, metadata={"enum": ["stop", "length"]})


class UsageSchema(Schema):
    prompt_tokens = fields.Integer(required=True)
    completion_tokens = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)


class ChatCompletionSchema(Schema):
    """The chat.completion object (with `stream: true`, a text/event-stream of
    chat.completion.chunk objects instead)."""

    id = fields.String(required=True, metadata={"example": "chatcmpl-8f2a..."})
    object = fields.String(required=True, metadata={"enum": ["chat.completion"]})
    created = fields.Integer(required=True)
    model = fields.String(required=True)
    system_fingerprint = fields.String()
    choices = fields.List(fields.Nested(ChatChoiceSchema), required=True)
    usage = fields.Nested(UsageSchema, required=True)
