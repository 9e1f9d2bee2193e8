"""The Responses API (/v1/responses and its token count), and vLLM-style
/tokenize and /detokenize: request and response schemas. Items, tools and
text.format are checked item by item in llmhost/generation/conversation.py, whose errors
name the item (``input[2].call_id``)."""
from __future__ import annotations

from marshmallow import ValidationError, fields, validate, validates_schema

from ..http.extensions import Schema
from .chat import MESSAGES, MessageSchema, template_kwargs_ok
from .generation import _int, refuse

ITEMS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}


class ResponseInputSchema(Schema):
    """What decides the prompt: shared by POST /v1/responses and its token count."""

    model = fields.String(required=True, validate=validate.Length(min=1), metadata={
        "description": "Id of a loaded model (see GET /v1/models)."})
    input = fields.Raw(required=True, metadata={
        **ITEMS, "description": "A string (one user message) or an array of items: messages "
                               "(`input_text` parts), `function_call` and "
                               "`function_call_output` items, `reasoning` items."})
    instructions = fields.String(allow_none=True, metadata={
        "description": "A system message put first. Not carried over by previous_response_id."})
    previous_response_id = fields.String(allow_none=True, metadata={
        "description": "Continue a stored response: its input and output items come first."})
    tools = fields.List(fields.Dict(), allow_none=True, metadata={
        "description": "Function tools `{type: function, name, description, parameters, "
                       "strict}`; built-in tool types are a 400."})
    tool_choice = fields.Raw(allow_none=True, metadata={
        "description": "`none`, `auto`, `required` or `{type: function, name}`."})
    parallel_tool_calls = fields.Boolean(allow_none=True)
    text = fields.Dict(allow_none=True, metadata={
        "description": "`{format: {type: text | json_object | json_schema, ...}}`: "
                       "structured output, as the chat route's response_format."})
    reasoning = fields.Dict(allow_none=True, metadata={
        "description": "`{effort}` for reasoning models; their thought comes back as a "
                       "`reasoning` output item."})

    @validates_schema(pass_original=True)
    def _refuse_unsupported(self, data, original, **kwargs):
        refuse(original, "conversation", (None,), " (use previous_response_id)")
        refuse(original, "prompt", (None,), " (prompt templates are an OpenAI service)")
        refuse(original, "truncation", (None, "disabled"), " (only 'disabled')")


class CreateResponseSchema(ResponseInputSchema):
    max_output_tokens = _int(validate=validate.Range(min=1), metadata={
        "description": "Most tokens to generate (default as max_tokens on chat); a response "
                       "cut by it has status `incomplete`."})
    temperature = fields.Float(allow_none=True, validate=validate.Range(0, 2), metadata={
        "description": "0..2; 0 is greedy decoding. Default LLMHOST_DEFAULT_TEMPERATURE."})
    top_p = fields.Float(allow_none=True, validate=validate.Range(0, 1, min_inclusive=False),
                         metadata={"description": "(0, 1]. Default LLMHOST_DEFAULT_TOP_P.",
                                   "exclusiveMinimum": True})
    metadata = fields.Dict(keys=fields.String(validate=validate.Length(max=64)),
                           values=fields.String(validate=validate.Length(max=512)),
                           allow_none=True, validate=validate.Length(max=16), metadata={
                               "description": "Up to 16 string pairs, stored and returned."})
    user = fields.String(allow_none=True, metadata={"description": "Stored and returned."})
    cache_salt = fields.String(allow_none=True, validate=validate.Length(1, 1024), metadata={
        "description": "vLLM's extra: only requests with the same salt share cached prompt "
                       "prefixes (docs/prefix-caching.md)."})
    store = fields.Boolean(load_default=True, allow_none=True, metadata={
        "description": "Keep the response (default true) for GET, input_items and "
                       "previous_response_id."})
    stream = fields.Boolean(load_default=False, allow_none=True, metadata={
        "description": "Answer with server-sent events named after their `type`."})

    @validates_schema(pass_original=True)
    def _refuse_more(self, data, original, **kwargs):
        refuse(original, "background", (None, False), " (responses run in the request)")
        refuse(original, "include", (None, []))
        refuse(original, "top_logprobs", (None, 0))
        refuse(original, "max_tool_calls", (None,))


class InputItemsQuerySchema(Schema):
    after = fields.String(metadata={"description": "An item id: list the items after it."})
    limit = fields.Integer(load_default=20, validate=validate.Range(1, 100))
    order = fields.String(load_default="desc", validate=validate.OneOf(["asc", "desc"]))


# -- documentation of the answers (bodies are built in llmhost/api/responses.py) ----

class ResponseUsageSchema(Schema):
    input_tokens = fields.Integer(required=True)
    input_tokens_details = fields.Dict(required=True)
    output_tokens = fields.Integer(required=True)
    output_tokens_details = fields.Dict(required=True)
    total_tokens = fields.Integer(required=True)


class ResponseSchema(Schema):
    """The response object (with `stream: true`, a text/event-stream of
    response events instead)."""

    id = fields.String(required=True, metadata={"example": "resp_8f2a..."})
    object = fields.String(required=True, metadata={"enum": ["response"]})
    created_at = fields.Integer(required=True)
    completed_at = fields.Integer(allow_none=True)
    status = fields.String(required=True, metadata={
        "enum": ["completed", "incomplete", "failed", "in_progress", "cancelled"]})
    error = fields.Dict(allow_none=True, required=True)
    incomplete_details = fields.Dict(allow_none=True, required=True)
    instructions = fields.String(allow_none=True, required=True)
    max_output_tokens = fields.Integer(allow_none=True)
    model = fields.String(required=True)
    output = fields.List(fields.Dict(), required=True, metadata={
        "description": "`message` (output_text), `function_call` and `reasoning` items."})
    output_text = fields.String(metadata={"description": "The text of the message items."})
    parallel_tool_calls = fields.Boolean(required=True)
    previous_response_id = fields.String(allow_none=True)
    store = fields.Boolean()
    temperature = fields.Float(required=True)
    top_p = fields.Float(required=True)
    text = fields.Dict()
    tool_choice = fields.Raw(required=True)
    tools = fields.List(fields.Dict(), required=True)
    usage = fields.Nested(ResponseUsageSchema)
    metadata = fields.Dict(required=True)


class DeletedResponseSchema(Schema):
    id = fields.String(required=True)
    object = fields.String(required=True, metadata={"enum": ["response"]})
    deleted = fields.Boolean(required=True)


class ResponseItemListSchema(Schema):
    object = fields.String(required=True, metadata={"enum": ["list"]})
    data = fields.List(fields.Dict(), required=True)
    first_id = fields.String(allow_none=True, required=True)
    last_id = fields.String(allow_none=True, required=True)
    has_more = fields.Boolean(required=True)


class InputTokensSchema(Schema):
    object = fields.String(required=True, metadata={"enum": ["response.input_tokens"]})
    input_tokens = fields.Integer(required=True)


# -- /tokenize and /detokenize (vLLM's shapes) ----------------------------------------

class TokenizeRequestSchema(Schema):
    OPENAPI = {"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]}

    model = fields.String(required=True, validate=validate.Length(min=1))
    prompt = fields.String(metadata={"description": "Text, tokenized as /v1/completions does."})
    messages = fields.List(fields.Nested(MessageSchema), validate=MESSAGES, metadata={
        "description": "A conversation, rendered as /v1/chat/completions does (generation "
                       "prompt included)."})
    add_special_tokens = fields.Boolean(load_default=True, metadata={
        "description": "With `prompt`: add the tokenizer's special tokens (as completions do)."})
    return_token_strs = fields.Boolean(load_default=False, metadata={
        "description": "Also return each token as a string."})
    # What changes how chat renders `messages`, so `count` stays that request's prompt_tokens.
    reasoning_effort = fields.String(allow_none=True, metadata={
        "description": "With `messages`: as in chat completions."})
    chat_template_kwargs = fields.Dict(keys=fields.String(), allow_none=True,
                                       validate=template_kwargs_ok, metadata={
        "description": "With `messages`: as in chat completions."})

    @validates_schema
    def _one_of(self, data, **kwargs):
        if ("prompt" in data) == ("messages" in data):
            raise ValidationError("give exactly one of 'prompt' or 'messages'", "prompt")


class TokenizeResponseSchema(Schema):
    count = fields.Integer(required=True)
    max_model_len = fields.Integer(required=True)
    tokens = fields.List(fields.Integer(), required=True)
    token_strs = fields.List(fields.String(), allow_none=True)


class DetokenizeRequestSchema(Schema):
    model = fields.String(required=True, validate=validate.Length(min=1))
    tokens = fields.List(fields.Integer(strict=True), required=True)


class DetokenizeResponseSchema(Schema):
    prompt = fields.String(required=True)
