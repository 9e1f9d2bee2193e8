"""POST /v1/rerank and POST /v1/score: request and response schemas."""
from __future__ import annotations

from marshmallow import ValidationError, fields, validate

from ..http.extensions import Schema

MODEL = {"description": "A loaded reranker (task `rerank`: a cross-encoder).", "example": "reranker"}


class Documents(fields.Field):
    """`documents`: strings, or objects holding a `text` string (Jina's and
    Cohere's shapes). Loads as a list of strings."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, list) or not value:
            raise ValidationError("must be a non-empty array of strings or of {\"text\": string} objects")
        texts = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                item = item.get("text")
            if not isinstance(item, str):
                raise ValidationError(f"documents[{i}] must be a string or an object with a "
                                      "string 'text'")
            texts.append(item)
        return texts


class Texts(fields.Field):
    """`text_1` / `text_2` of /v1/score: a string or a non-empty array of strings;
    loads as a list."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
        raise ValidationError("must be a string or a non-empty array of strings")


class RerankRequestSchema(Schema):
    model = fields.String(required=True, validate=validate.Length(min=1), metadata=MODEL)
    query = fields.String(required=True, metadata={"example": "What is the capital of France?"})
    documents = Documents(required=True, metadata={
        "type": "array", "minItems": 1,
        "items": {"oneOf": [{"type": "string"}, {"type": "object", "required": ["text"],
                                                  "properties": {"text": {"type": "string"}}}]},
        "description": "Texts to rank against `query` (at most LLMHOST_MAX_RERANK_DOCUMENTS). A "
                       "query and document pair longer than the model reads is cut, the longer "
                       "of the two first, as sentence-transformers does.",
        "example": ["Paris is the capital of France.", "The fox jumps."]})
    top_n = fields.Integer(allow_none=True, validate=validate.Range(min=1), metadata={
        "description": "Answer only the N best documents (default: all)."})
    return_documents = fields.Boolean(load_default=True, metadata={
        "description": "Include each document's text in its result (default true, as Jina and "
                       "vLLM; Cohere's clients send false)."})


class ScoreRequestSchema(Schema):
    model = fields.String(required=True, validate=validate.Length(min=1), metadata=MODEL)
    text_1 = Texts(required=True, metadata={
        "oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}],
        "description": "One text (scored against every `text_2`) or as many texts as `text_2` "
                       "(scored pairwise).", "example": "What is the capital of France?"})
    text_2 = Texts(required=True, metadata={
        "oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}],
        "example": ["Paris is the capital of France.", "The fox jumps."]})


# -- responses (documentation; the bodies are built in llmhost/api/rerank.py) --

class RerankUsageSchema(Schema):
    prompt_tokens = fields.Integer(required=True, metadata={
        "description": "Tokens of every pair the model read, special tokens included."})
    total_tokens = fields.Integer(required=True)


class DocumentSchema(Schema):
    text = fields.String(required=True)


class RerankResultSchema(Schema):
    index = fields.Integer(required=True, metadata={"description": "Position in `documents`."})
    relevance_score = fields.Float(required=True, metadata={
        "description": "The cross-encoder's score, after its activation (a sigmoid for most: "
                       "0 to 1), as `CrossEncoder.predict` gives it."})
    document = fields.Nested(DocumentSchema, metadata={"description": "With `return_documents`."})


class RerankResponseSchema(Schema):
    id = fields.String(required=True)
    model = fields.String(required=True)
    results = fields.List(fields.Nested(RerankResultSchema), required=True, metadata={
        "description": "Best first."})
    usage = fields.Nested(RerankUsageSchema, required=True)


class ScoreDataSchema(Schema):
    index = fields.Integer(required=True)
    object = fields.String(required=True, metadata={"enum": ["score"]})
    score = fields.Float(required=True)


class ScoreResponseSchema(Schema):
    id = fields.String(required=True)
    object = fields.String(required=True, metadata={"enum": ["list"]})
    created = fields.Integer(required=True)
    model = fields.String(required=True)
    data = fields.List(fields.Nested(ScoreDataSchema), required=True)
    usage = fields.Nested(RerankUsageSchema, required=True)
