"""Request schemas for structured outputs and tools: `response_format`,
llmhost's `structured_outputs` extra, `tools` / `tool_choice` and the
deprecated `functions` / `function_call`. What needs the model (compiling the
grammar) is checked later, in generation/tools.py; errors name the field as
OpenAI does (``response_format.json_schema.schema``, ``tools[0].function.name``)."""
from __future__ import annotations

import json

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from marshmallow import ValidationError, fields, post_load, validate, validates, validates_schema

from ..config import settings
from ..http.extensions import Schema

NAME = validate.Regexp(r"^[a-zA-Z0-9_-]{1,64}$", error="must be 1 to 64 letters, digits, "
                                                      "underscores or dashes")


def check_size(value, key: str | None = None) -> None:
    """Grammars, regexes and schemas bigger than LLMHOST_MAX_GRAMMAR_BYTES (UTF-8,
    schemas as JSON) are refused before compiling: compile time and memory grow
    with the grammar, and a request must not hold the model's compiler for long."""
    limit = settings().MAX_GRAMMAR_BYTES
    text = value if isinstance(value, str) else json.dumps(value)
    size = len(text.encode("utf-8"))
    if limit and size > limit:
        raise ValidationError(f"is {size} bytes, larger than this server's limit of {limit} bytes "
                              "(LLMHOST_MAX_GRAMMAR_BYTES); send a smaller one", key)


def check_json_schema(value, what: str = "a JSON Schema") -> None:
    if not isinstance(value, dict):
        raise ValidationError(f"must be {what} (an object)")
    try:
        Draft202012Validator.check_schema(value)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise ValidationError(f"is not a valid JSON Schema: {exc.message}"
                              + (f" (at '{where}')" if where else ""))
    check_size(value)


class JsonSchemaSchema(Schema):
    name = fields.String(required=True, validate=NAME)
    description = fields.String(allow_none=True)
    schema_ = fields.Dict(data_key="schema", allow_none=True, metadata={
        "description": "The JSON Schema every answer validates against."})
    strict = fields.Boolean(allow_none=True, metadata={
        "description": "Accepted; answers always follow the schema (constrained decoding)."})

    @validates("schema_")
    def _check(self, value, **kwargs):
        if value is not None:
            check_json_schema(value)

    @post_load
    def _wire_name(self, data, **kwargs):
        """`schema_` is only the attribute name (it would shadow marshmallow's
        own); the loaded request uses OpenAI's key, `schema`."""
        if "schema_" in data:
            data["schema"] = data.pop("schema_")
        return data


class ResponseFormatSchema(Schema):
    type = fields.String(required=True, validate=validate.OneOf(
        ("text", "json_object", "json_schema"),
        error="must be one of text, json_object, json_schema"))
    json_schema = fields.Nested(JsonSchemaSchema, allow_none=True)

    @validates_schema
    def _needs_schema(self, data, **kwargs):
        if data.get("type") == "json_schema" and not data.get("json_schema"):
            raise ValidationError("Missing data for required field.", "json_schema")


class StructuredOutputsSchema(Schema):
    """llmhost extra (vLLM's names): exactly one of these."""

    regex = fields.String(allow_none=True, metadata={"description": "A regular expression the "
                                                                    "whole answer matches."})
    choice = fields.List(fields.String(), allow_none=True, metadata={
        "description": "The answer is exactly one of these strings."})
    grammar = fields.String(allow_none=True, metadata={
        "description": "An EBNF grammar in xgrammar's (GBNF-like) syntax, root rule `root`."})
    json = fields.Raw(allow_none=True, metadata={
        "description": "A JSON Schema (same as response_format json_schema)."})

    @validates_schema
    def _exactly_one(self, data, **kwargs):
        given = [k for k in ("regex", "choice", "grammar", "json") if data.get(k) is not None]
        if len(given) != 1:
            raise ValidationError("give exactly one of regex, choice, grammar, json")
        key = given[0]
        value = data[key]
        if key == "json":
            check_json_schema(value)
        elif key == "choice" and not value:
            raise ValidationError("must hold at least one string", key)
        if key != "json":
            check_size(value, key)


class FunctionSchema(Schema):
    name = fields.String(required=True, validate=NAME)
    description = fields.String(allow_none=True)
    parameters = fields.Dict(allow_none=True, metadata={
        "description": "A JSON Schema of type object for the arguments."})
    strict = fields.Boolean(allow_none=True)

    @validates("parameters")
    def _object_schema(self, value, **kwargs):
        if value is None:
            return
        check_json_schema(value, "a JSON Schema of type object")
        if value.get("type", "object") != "object":
            raise ValidationError("must be a JSON Schema of type 'object' (the arguments are a "
                                  f"JSON object), got type {value.get('type')!r}")


class ToolSchema(Schema):
    type = fields.String(required=True, validate=validate.OneOf(
        ("function",), error="must be 'function' (the only tool type of chat completions)"))
    function = fields.Nested(FunctionSchema, required=True)


def tool_choice_error(choice, names: list[str]) -> str | None:
    """Why `tool_choice` (already in chat form) does not fit the tools, or None."""
    if choice in (None, "none", "auto"):
        return None
    if choice == "required":
        return None if names else "is 'required' but no tools were given"
    if isinstance(choice, dict) and choice.get("type") == "function" and \
            isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str):
        name = choice["function"]["name"]
        if name not in names:
            return (f"names the function {name!r}, which is not among the tools "
                    f"({', '.join(names) or 'none given'})")
        return None
    return ("must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
            "{\"name\": ...}}")


def function_call_as_tool_choice(value):
    """The deprecated `function_call` as a `tool_choice`."""
    if isinstance(value, dict) and "name" in value:
        return {"type": "function", "function": {"name": value["name"]}}
    return value
