"""POST /v1/completions (legacy text completions): request and response schemas."""
from __future__ import annotations

from marshmallow import ValidationError, fields, validate, validates_schema

from ..generation.request import CompletionRequest
from ..http.extensions import Schema
from .chat import UsageSchema
from .generation import GenerationSchema, _int, refuse
from .tokens import is_token_ids


class Prompt(fields.Field):
    """`prompt`: a string, an array of strings, an array of token ids, or an
    array of arrays of token ids."""

    ERROR = "must be a string, an array of strings, an array of token ids or an array of arrays " \
            "of token ids"

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValidationError(self.ERROR if not isinstance(value, list)
                                  else "must not be an empty array")
        if all(isinstance(p, str) for p in value) or is_token_ids(value):
            return value
        if all(is_token_ids(p) for p in value):
            if not all(value):
                raise ValidationError("token id arrays must not be empty")
            return value
        raise ValidationError(self.ERROR)


class CompletionRequestSchema(GenerationSchema):
    REQUEST = CompletionRequest

    prompt = Prompt(required=True, metadata={
        "oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}},
                  {"type": "array", "minItems": 1, "items": {"type": "integer"}},
                  {"type": "array", "minItems": 1,
                   "items": {"type": "array", "minItems": 1, "items": {"type": "integer"}}}],
        "description": "Text or token ids; an array of prompts gives len(prompt) x n choices."})
    echo = fields.Boolean(load_default=False, allow_none=True, metadata={
        "description": "Return the prompt followed by the completion."})
    logprobs = _int(validate=validate.Range(0, 5), metadata={
        "description": "0..5: log probability of each generated token plus this many "
                       "alternatives (legacy format)."})
    # Documented with the only values the route takes (null, and "" for suffix).
    suffix = fields.String(allow_none=True, metadata={"description": "Not supported: a 400.",
                                                      "enum": ["", None]})
    best_of = fields.Integer(allow_none=True, metadata={"description": "Not supported: a 400.",
                                                        "enum": [None]})

    @validates_schema(pass_original=True)
    def _refuse_unsupported(self, data, original, **kwargs):
        refuse(original, "suffix", (None, ""), " (insertion needs a fill-in-the-middle model)")
        refuse(original, "best_of", (None,), "; use 'n' and pick a choice yourself")


# -- responses (documentation; bodies are built in llmhost/api/completions.py) --

class LegacyLogprobsSchema(Schema):
    tokens = fields.List(fields.String())
    token_logprobs = fields.List(fields.Float())
    top_logprobs = fields.List(fields.Dict(keys=fields.String(), values=fields.Float()))
    text_offset = fields.List(fields.Integer())


class CompletionChoiceSchema(Schema):
    index = fields.Integer(required=True)
    text = fields.String(required=True)
    logprobs = fields.Nested(LegacyLogprobsSchema, allow_none=True, required=True)
    finish_reason = fields.String(required=True, metadata={"enum": ["stop", "length"]})


class CompletionSchema(Schema):
    """The text_completion object (with `stream: true`, a text/event-stream of
    objects of the same shape, one per piece of text)."""

    id = fields.String(required=True, metadata={"example": "cmpl-8f2a..."})
    object = fields.String(required=True, metadata={"enum": ["text_completion"]})
    created = fields.Integer(required=True)
    model = fields.String(required=True)
    system_fingerprint = fields.String()
    choices = fields.List(fields.Nested(CompletionChoiceSchema), required=True)
    usage = fields.Nested(UsageSchema, required=True)

