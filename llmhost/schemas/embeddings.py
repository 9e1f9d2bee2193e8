"""POST /v1/embeddings: request and response schemas."""
from __future__ import annotations

from marshmallow import ValidationError, fields, validate

from ..http.extensions import Schema
from .tokens import is_token_ids


class EmbeddingInput(fields.Field):
    """`input`: a string, an array of strings, an array of token ids, or an array
    of arrays of token ids. Loads as a list of strings or a list of id lists, so
    the engine sees one shape."""

    ERROR = ("must be a non-empty string, an array of strings, an array of token ids or an array "
             "of arrays of token ids")

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            if not value:
                raise ValidationError("must not be an empty string")
            return [value]
        if not isinstance(value, list):
            raise ValidationError(self.ERROR)
        if not value:
            raise ValidationError("must not be an empty array")
        if all(isinstance(item, str) for item in value):
            empty = next((i for i, item in enumerate(value) if not item), None)
            if empty is not None:
                raise ValidationError(f"input[{empty}] is an empty string; every input must hold text")
            return value
        if is_token_ids(value):
            return [value]
        if all(is_token_ids(item) for item in value):
            empty = next((i for i, item in enumerate(value) if not item), None)
            if empty is not None:
                raise ValidationError(f"input[{empty}] is an empty array of token ids")
            return value
        raise ValidationError(self.ERROR + " (one kind per request)")


class EmbeddingRequestSchema(Schema):
    model = fields.String(required=True, validate=validate.Length(min=1), metadata={
        "description": "A loaded embedding model (task `embed`).", "example": "minilm"})
    input = EmbeddingInput(required=True, metadata={
        "oneOf": [{"type": "string", "minLength": 1},
                  {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                  {"type": "array", "minItems": 1, "items": {"type": "integer"}},
                  {"type": "array", "minItems": 1,
                   "items": {"type": "array", "minItems": 1, "items": {"type": "integer"}}}],
        "description": "Text, or token ids without special tokens (the server adds them, as it "
                       "does for text). Token ids are OpenAI's (tiktoken cl100k_base, as LangChain "
                       "sends them): decoded, then tokenized by the model; with `token_ids: model` "
                       "they are the model's own. At most LLMHOST_MAX_EMBED_INPUTS inputs; none "
                       "may be empty.",
        "example": ["The food was delicious.", "Le repas était délicieux."]})
    encoding_format = fields.String(load_default="float", validate=validate.OneOf(["float", "base64"]),
                                    metadata={"description": "`float`: arrays of numbers; `base64`: "
                                              "little-endian float32 bytes, base64-encoded."})
    dimensions = fields.Integer(allow_none=True, validate=validate.Range(min=1), metadata={
        "description": "Keep the first N dimensions and re-normalise to unit length. At most the "
                       "model's size."})
    user = fields.String(allow_none=True, metadata={"description": "Accepted and ignored."})
    token_ids = fields.String(validate=validate.OneOf(["cl100k_base", "model"]), metadata={
        "description": "llmhost extra. How token-id `input` is read: `cl100k_base` (OpenAI's "
                       "tokenization, the default unless LLMHOST_EMBED_TOKEN_IDS says otherwise) or "
                       "`model` (ids of the served model's own tokenizer)."})
    truncate = fields.Boolean(load_default=False, metadata={
        "description": "llmhost extra. `false` (default): an input longer than the model's maximum "
                       "length is a 400; `true`: cut it there, as sentence-transformers does."})


# -- responses (documentation; the body is built in llmhost/api/embeddings.py) --

class EmbeddingSchema(Schema):
    object = fields.String(required=True, metadata={"enum": ["embedding"]})
    index = fields.Integer(required=True)
    embedding = fields.Raw(required=True, metadata={
        "oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}],
        "description": "Numbers, or a base64 string with `encoding_format: base64`."})


class EmbeddingUsageSchema(Schema):
    prompt_tokens = fields.Integer(required=True, metadata={
        "description": "Tokens the model read, special tokens included."})
    total_tokens = fields.Integer(required=True)


class EmbeddingResponseSchema(Schema):
    object = fields.String(required=True, metadata={"enum": ["list"]})
    data = fields.List(fields.Nested(EmbeddingSchema), required=True)
    model = fields.String(required=True)
    usage = fields.Nested(EmbeddingUsageSchema, required=True)
