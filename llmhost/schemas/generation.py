"""Request fields shared by /v1/chat/completions and /v1/completions, with
OpenAI's ranges. Limits that depend on the server (n, messages) read the
config; limits that depend on the model (context, vocabulary) are checked once
the model is known, in the API layer."""
from __future__ import annotations

import re

from marshmallow import ValidationError, fields, post_load, validate, validates

from ..config import settings
from ..generation.request import TextRequest
from ..http.errors import not_supported
from ..http.extensions import Schema
from .structured import ResponseFormatSchema, StructuredOutputsSchema


class Stop(fields.Field):
    """`stop`: a string or a list of up to 4 strings."""

    MAX = 4

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            if len(value) > self.MAX:
                raise ValidationError(f"at most {self.MAX} stop sequences are allowed, got "
                                      f"{len(value)}")
            return value
        raise ValidationError("must be a string or an array of up to 4 strings")


class StreamOptionsSchema(Schema):
    include_usage = fields.Boolean(load_default=False, metadata={
        "description": "Send a last chunk with `usage` and empty `choices` before `[DONE]`."})


# Below this the penalty divides logits into inf and the sampler into NaN.
MIN_REPETITION_PENALTY = 0.01
_TOKEN_ID = re.compile(r"[0-9]{1,10}")


def _int(**kwargs):
    return fields.Integer(strict=True, allow_none=True, **kwargs)


class GenerationSchema(Schema):
    """Fields both routes take. Defaults of None mean "the server's default".
    A subclass names the typed request it loads into (generation/request.py)."""

    REQUEST: type = TextRequest

    model = fields.String(required=True, validate=validate.Length(min=1), metadata={
        "description": "Id of a loaded model (see GET /v1/models).", "example": "smollm2"})
    max_tokens = _int(validate=validate.Range(min=1), metadata={
        "description": "Most tokens to generate per choice. Default LLMHOST_DEFAULT_MAX_TOKENS "
                       "(512), lowered to what fits in the model's context; an explicit value "
                       "that does not fit is a 400."})
    temperature = fields.Float(allow_none=True, validate=validate.Range(0, 2), metadata={
        "description": "0..2; 0 (or anything below 1e-5) is greedy decoding. Default LLMHOST_DEFAULT_TEMPERATURE (0.7)."})
    top_p = fields.Float(allow_none=True, validate=validate.Range(0, 1),
                         metadata={"description": "Nucleus sampling, 0..1 (0 keeps only the most "
                                                  "likely token). Default LLMHOST_DEFAULT_TOP_P "
                                                  "(0.9)."})
    top_k = _int(validate=validate.Range(min=0), metadata={
        "description": "llmhost extra: sample among the k most likely tokens; 0 (default) is off."})
    min_p = fields.Float(allow_none=True, validate=validate.Range(0, 1), metadata={
        "description": "llmhost extra: drop tokens below min_p x the top probability; 0 is off."})
    repetition_penalty = fields.Float(allow_none=True, validate=validate.Range(
        MIN_REPETITION_PENALTY, 10), metadata={
        "description": "llmhost extra: transformers' multiplicative penalty over prompt and "
                       "output tokens, 0.01..10; 1 (default) is off."})
    presence_penalty = fields.Float(allow_none=True, validate=validate.Range(-2, 2), metadata={
        "description": "-2..2, OpenAI's additive penalty on tokens already generated."})
    frequency_penalty = fields.Float(allow_none=True, validate=validate.Range(-2, 2), metadata={
        "description": "-2..2, OpenAI's additive penalty proportional to each token's count so far."})
    logit_bias = fields.Dict(keys=fields.String(), values=fields.Float(), allow_none=True, metadata={
        "description": "{token id: bias -100..100} added to the logits."})
    stop = Stop(allow_none=True, metadata={
        "description": "Up to 4 strings; generation stops before the first one (matched on the "
                       "text, across tokens), finish_reason `stop`.",
        "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]})
    n = _int(validate=validate.Range(min=1), metadata={
        "description": "Choices to generate, 1..LLMHOST_MAX_N (8)."})
    seed = _int(validate=validate.Range(-2 ** 63, 2 ** 63 - 1), metadata={
        "description": "A signed 64-bit integer. Same seed, same request: same output, whatever "
                       "else the server is doing (choice i uses seed + i, modulo 2**64)."})
    stream = fields.Boolean(load_default=False, allow_none=True, metadata={
        "description": "Answer with server-sent events (`data: {chunk}` ... `data: [DONE]`)."})
    stream_options = fields.Nested(StreamOptionsSchema, allow_none=True)
    user = fields.String(allow_none=True, metadata={"description": "Accepted and ignored."})
    cache_salt = fields.String(allow_none=True, validate=validate.Length(1, 1024), metadata={
        "description": "vLLM's extra: only requests with the same salt share cached prompt "
                       "prefixes (docs/prefix-caching.md)."})
    response_format = fields.Nested(ResponseFormatSchema, allow_none=True, metadata={
        "description": "`text`, `json_object` or `json_schema` (answers always parse and "
                       "validate: constrained decoding)."})
    structured_outputs = fields.Nested(StructuredOutputsSchema, allow_none=True, metadata={
        "description": "llmhost extra: one of `regex`, `choice`, `grammar` (xgrammar EBNF), "
                       "`json` (a JSON Schema)."})

    @validates("n")
    def _check_n(self, value, **kwargs):
        limit = settings().MAX_N
        if value is not None and value > limit:
            raise ValidationError(f"must be at most {limit} on this server (LLMHOST_MAX_N)")

    @validates("logit_bias")
    def _check_logit_bias(self, value, **kwargs):
        for key, bias in (value or {}).items():
            # ASCII digits only: "²".isdigit() is true but int("²") raises.
            if not isinstance(key, str) or not _TOKEN_ID.fullmatch(key.strip()):
                raise ValidationError(f"keys must be token ids (integers as strings), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValidationError(f"the bias of token {key} is {bias}; biases must be "
                                      "between -100 and 100")

    @post_load
    def _typed(self, data, **kwargs):
        return self.REQUEST(**data)


def refuse(original, name: str, allowed: tuple = (None,), hint: str = "") -> None:
    """A known OpenAI field llmhost does not implement answers 400 naming it,
    rather than an answer that silently ignores what the client asked for.
    Values that ask for nothing (null, [], "none") pass."""
    if isinstance(original, dict) and name in original and original[name] not in allowed:
        raise not_supported(name, hint)
