"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens.

The request's top level is checked here (types and ranges as Anthropic's);
content blocks, tools and tool_choice are checked where they are translated
(generation/anthropic.py), naming the field."""
from __future__ import annotations

from marshmallow import ValidationError, fields, validate, validates

from ..http.extensions import Schema


def _int(**kwargs):
    return fields.Integer(strict=True, allow_none=True, **kwargs)


class CountTokensSchema(Schema):
    model = fields.String(required=True, validate=validate.Length(min=1), metadata={
        "description": "Id (or alias) of a loaded model."})
    messages = fields.List(fields.Raw(), required=True, metadata={
        "description": "Turns of `user` and `assistant`, with a string or content blocks "
                       "(`text`, `tool_use`, `tool_result`, `thinking`)."})
    system = fields.Raw(allow_none=True, metadata={
        "description": "A string or text blocks (`cache_control` is accepted and ignored)."})
    tools = fields.List(fields.Raw(), allow_none=True, metadata={
        "description": "Custom tools: `name`, `description`, `input_schema`."})
    tool_choice = fields.Raw(allow_none=True, metadata={
        "description": "`{\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}` (`name` with "
                       "`tool`; `disable_parallel_tool_use`)."})
    thinking = fields.Dict(allow_none=True, metadata={
        "description": "`{\"type\": \"disabled\"}` renders templates with an enable_thinking "
                       "switch with thinking off; `enabled` lets a reasoning model think."})

    output_config = fields.Dict(allow_none=True, metadata={
        "description": "`format`: `{\"type\": \"json_schema\", \"schema\": ...}` (a grammar "
                       "holds the answer to it); `effort`: passed as reasoning_effort."})

    @validates("messages")
    def _not_empty(self, value, **kwargs):
        if not value:
            raise ValidationError("must contain at least one message")


class MessagesRequestSchema(CountTokensSchema):
    max_tokens = _int(required=True, validate=validate.Range(min=1), metadata={
        "description": "Most tokens to generate (required, as Anthropic's API)."})
    stop_sequences = fields.List(fields.String(), allow_none=True, validate=validate.Length(max=4))
    temperature = fields.Float(allow_none=True, validate=validate.Range(0, 1), metadata={
        "description": "0..1; 0 is greedy decoding."})
    top_p = fields.Float(allow_none=True, validate=validate.Range(0, 1))
    top_k = _int(validate=validate.Range(min=0))
    metadata = fields.Dict(allow_none=True, metadata={"description": "Accepted and ignored."})
    stream = fields.Boolean(load_default=False, metadata={
        "description": "Server-sent events: message_start, content_block_start / delta / stop, "
                       "message_delta, message_stop."})


class AnthropicMessageSchema(Schema):
    """The message object (with `stream: true`, Anthropic's event stream)."""

    id = fields.String(required=True)
    type = fields.String(required=True, metadata={"enum": ["message"]})
    role = fields.String(required=True, metadata={"enum": ["assistant"]})
    model = fields.String(required=True)
    content = fields.List(fields.Dict(), required=True)
    stop_reason = fields.String(allow_none=True, metadata={
        "enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]})
    stop_sequence = fields.String(allow_none=True)
    usage = fields.Dict(required=True)


class TokenCountSchema(Schema):
    input_tokens = fields.Integer(required=True)
