"""POST /v1/chat/completions: request and response schemas."""
from __future__ import annotations

from marshmallow import ValidationError, fields, validate, validates_schema

from ..http.extensions import Schema
from ..config import settings
from ..generation.reasoning import RESERVED
from ..generation.request import ChatRequest
from .generation import GenerationSchema, _int
from .structured import (FunctionSchema, ToolList, ToolSchema, function_call_as_tool_choice,
                         json_text, tool_choice_error)

ROLES = ("system", "developer", "user", "assistant", "tool")


def template_kwargs_ok(value) -> None:
    """`chat_template_kwargs` may not set what llmhost passes to apply_chat_template."""
    taken = sorted(RESERVED.intersection(value or {}))
    if taken:
        raise ValidationError(f"{', '.join(taken)} cannot be set here (llmhost passes "
                              "it to apply_chat_template itself)")


class Content(fields.Field):
    """`content`: a string or an array of `{"type": "text", "text": ...}` and
    `{"type": "image_url", "image_url": {"url": ...}}` parts (images are decoded
    and checked with the model in hand: generation/images.py). Errors name the
    part: ``messages[0].content[1].type``."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValidationError("must be a string or an array of content parts")
        errors: dict = {}
        for i, part in enumerate(value):
            if not isinstance(part, dict):
                errors[i] = ["must be an object like {\"type\": \"text\", \"text\": \"...\"}"]
            elif part.get("type") == "image_url":
                image = part.get("image_url")
                if not isinstance(image, dict) or not isinstance(image.get("url"), str):
                    errors[i] = {"image_url": ["must be an object with a 'url' string"]}
            elif part.get("type") != "text":
                kind = part.get("type")
                errors[i] = {"type": [f"content parts of type {kind!r} are not supported (use "
                                      "type 'text', or 'image_url' for vision models)"]}
            elif not isinstance(part.get("text"), str):
                errors[i] = {"text": ["must be a string"]}
        if errors:
            raise ValidationError(errors)
        return [{"type": "image_url", "image_url": {"url": part["image_url"]["url"]}}
                if part["type"] == "image_url" else {"type": "text", "text": part["text"]}
                for part in value]


class MessageSchema(Schema):
    role = fields.String(required=True, validate=validate.OneOf(
        ROLES, error="must be one of system, developer, user, assistant, tool"))
    content = Content(allow_none=True, metadata={
        "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}],
        "description": "A string, or an array of text parts and (for vision-language models) "
                       "image_url parts."})
    name = fields.String(allow_none=True, metadata={"description": "Passed to the chat template."})
    tool_call_id = fields.String(allow_none=True)
    tool_calls = fields.List(fields.Nested(lambda: ToolCallSchema()), allow_none=True, metadata={
        "description": "An assistant turn's calls, rendered for the next turn."})

    @validates_schema
    def _content_required(self, data, **kwargs):
        # Only an assistant turn (one that called tools) may come without content.
        if data.get("content") is None and data.get("role") != "assistant":
            raise ValidationError("Missing data for required field.", "content")


class ToolCallFunctionSchema(Schema):
    name = fields.String(required=True)
    arguments = fields.String(required=True, validate=json_text, metadata={
        "description": "JSON text."})


class ToolCallSchema(Schema):
    id = fields.String(required=True)
    type = fields.String(load_default="function", validate=validate.OneOf(("function",)))
    function = fields.Nested(ToolCallFunctionSchema, required=True)


def check_messages(value) -> None:
    limit = settings().MAX_MESSAGES
    if limit and len(value) > limit:
        raise ValidationError(f"at most {limit} messages are allowed on this server "
                              "(LLMHOST_MAX_MESSAGES)")


# `messages` of chat and /tokenize: at least one (the document says minItems 1), at
# most LLMHOST_MAX_MESSAGES.
MESSAGES = (validate.Length(min=1, error="must contain at least one message"), check_messages)


class ChatCompletionRequestSchema(GenerationSchema):
    REQUEST = ChatRequest

    messages = fields.List(fields.Nested(MessageSchema), required=True, validate=MESSAGES,
                           metadata={"description": "The conversation, rendered with the model's "
                                                    "chat template."})
    max_completion_tokens = _int(validate=validate.Range(min=1), metadata={
        "description": "Same as max_tokens (OpenAI's newer name); wins when both are given."})
    logprobs = fields.Boolean(allow_none=True, metadata={
        "description": "Return the log probability of each generated token."})
    top_logprobs = _int(validate=validate.Range(0, 20), metadata={
        "description": "0..20 most likely alternatives per token; needs `logprobs: true`."})
    metadata = fields.Dict(allow_none=True, metadata={"description": "Accepted and ignored."})
    store = fields.Boolean(allow_none=True, metadata={"description": "Accepted and ignored."})
    parallel_tool_calls = fields.Boolean(allow_none=True, metadata={
        "description": "false: at most one call per answer (default true)."})
    tools = ToolList(fields.Nested(ToolSchema), allow_none=True, metadata={
        "description": "Functions the model may call (rendered by the chat template, or by "
                       "llmhost's fallback system turn)."})
    tool_choice = fields.Raw(allow_none=True, metadata={
        "description": "`none`, `auto` (default with tools), `required` or "
                       "`{\"type\": \"function\", \"function\": {\"name\": ...}}`; "
                       "required and named calls are enforced by a grammar."})
    reasoning_effort = fields.String(allow_none=True, validate=validate.OneOf(
        ("none", "minimal", "low", "medium", "high", "xhigh", "max")), metadata={
        "description": "Passed to the chat template as `reasoning_effort` (also from "
                       "/v1/responses' `reasoning.effort`); `none` also renders templates with "
                       "an `enable_thinking` switch (Qwen3, SmolLM3) with thinking off. The "
                       "thought comes back as `reasoning_content`."})
    chat_template_kwargs = fields.Dict(
        keys=fields.String(), allow_none=True, validate=template_kwargs_ok, metadata={
            "description": "llmhost extra (vLLM's name): more variables for the chat template, "
                           "e.g. `{\"enable_thinking\": false}`; they win over what "
                           "`reasoning_effort` sets."})
    functions = ToolList(fields.Nested(FunctionSchema), allow_none=True, metadata={
        "description": "Deprecated form of `tools`."})
    function_call = fields.Raw(allow_none=True, metadata={
        "description": "Deprecated form of `tool_choice` (`none`, `auto`, `{\"name\": ...}`)."})

    @validates_schema(pass_original=True)
    def _check_combinations(self, data, original, **kwargs):
        if data.get("top_logprobs") is not None and not data.get("logprobs"):
            raise ValidationError("requires 'logprobs': true", "top_logprobs")
        if data.get("tools") and data.get("functions"):
            raise ValidationError("give either 'tools' or the deprecated 'functions', not both",
                                  "functions")
        if data.get("functions"):
            names = [f["name"] for f in data["functions"]]
            where, choice = "function_call", function_call_as_tool_choice(data.get("function_call"))
        else:
            names = [t["function"]["name"] for t in data.get("tools") or []]
            where, choice = "tool_choice", data.get("tool_choice")
            if choice is None and data.get("function_call") is not None:
                where, choice = "function_call", function_call_as_tool_choice(data["function_call"])
        problem = tool_choice_error(choice, names)
        if problem:
            raise ValidationError(problem, where)
        if len(set(names)) != len(names):
            raise ValidationError("function names must be unique", "tools")


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
    tool_calls = fields.List(fields.Nested(ToolCallSchema), metadata={
        "description": "Calls parsed from the answer (finish_reason `tool_calls`)."})
    reasoning_content = fields.String(metadata={
        "description": "llmhost extra: the model's <think> text, for reasoning models."})


class ChatChoiceSchema(Schema):
    index = fields.Integer(required=True)
    message = fields.Nested(AssistantMessageSchema, required=True)
    logprobs = fields.Nested(ChoiceLogprobsSchema, allow_none=True, required=True)
    finish_reason = fields.String(required=True, metadata={
        "enum": ["stop", "length", "tool_calls", "function_call"]})


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
