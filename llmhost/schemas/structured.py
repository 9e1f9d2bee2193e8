"""Request schemas for structured outputs and tools: `response_format`,
llmhost's `structured_outputs` extra, `tools` / `tool_choice` and the
deprecated `functions` / `function_call`. What needs the model (compiling the
grammar) is checked later, in generation/tools.py; errors name the field as
OpenAI does (``response_format.json_schema.schema``, ``tools[0].function.name``)."""
from __future__ import annotations

import json

from marshmallow import ValidationError, fields, post_load, validate, validates_schema

from ..config import settings
from ..http.checks import MAX_JSON_DEPTH, text_depth
from ..http.extensions import Schema

NAME = validate.Regexp(r"^[a-zA-Z0-9_-]{1,64}$", error="must be 1 to 64 letters, digits, "
                                                      "underscores or dashes")


def json_text(value: str) -> None:
    """A JSON text a client sends inside a string (a tool call's `arguments`):
    the body's depth guard never sees into it, and it is parsed later."""
    if text_depth(value) > MAX_JSON_DEPTH:
        raise ValidationError(f"nests deeper than {MAX_JSON_DEPTH} levels; no call needs that")


def _json_bytes(value) -> int:
    return len((value if isinstance(value, str) else json.dumps(value)).encode("utf-8"))


def check_size(value, key: str | None = None) -> None:
    """Grammars, regexes and schemas bigger than LLMHOST_MAX_GRAMMAR_BYTES (UTF-8,
    schemas as JSON) are refused before compiling: compile time and memory grow
    with the grammar, and a request must not hold the model's compiler for long."""
    limit = settings().MAX_GRAMMAR_BYTES
    size = _json_bytes(value)
    if limit and size > limit:
        raise ValidationError(f"is {size} bytes, larger than this server's limit of {limit} bytes "
                              "(LLMHOST_MAX_GRAMMAR_BYTES); send a smaller one", key)


# Where JSON Schema keywords hold subschemas (the rest hold data: enum, const, ...).
_SCHEMA = ("additionalProperties", "items", "additionalItems", "not", "if", "then", "else",
           "contains", "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Keywords xgrammar's JSON Schema converter does not enforce (measured on 0.2.9:
# the grammar is the same with or without them). Under `strict` they are refused,
# as OpenAI's strict mode refuses what it cannot guarantee, rather than ignored.
UNENFORCED = ("not", "if", "then", "else", "uniqueItems", "contains", "propertyNames",
              "dependentRequired", "dependentSchemas", "unevaluatedProperties",
              "unevaluatedItems")


def _pointer(root, ref: str) -> bool:
    """Whether the local reference `ref` ("#" or "#/a/b") points into `root`."""
    if ref == "#":
        return True
    if not ref.startswith("#/"):
        return False
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def check_structure(schema, strict: bool) -> None:
    """What xgrammar's compile time grows with, counted before compiling (and
    before the slower metaschema check): subschemas and enum values
    (LLMHOST_MAX_GRAMMAR_NODES) and optional properties, whose grammar grows
    with their square (LLMHOST_MAX_GRAMMAR_OPTIONAL; measured in
    docs/hardening.md). Also refuses references outside the schema (xgrammar
    would make them "any JSON") and, under `strict`, keywords the grammar
    cannot enforce. Iterative: the body's depth is bounded already."""
    config = settings()
    nodes = optional = 0
    stack = [(schema, "")]
    while stack:
        node, where = stack.pop()
        if not isinstance(node, dict):
            continue
        nodes += 1 + (len(node["enum"]) if isinstance(node.get("enum"), list) else 0)
        at = f" (at '{where}')" if where else ""
        if config.MAX_GRAMMAR_NODES and nodes > config.MAX_GRAMMAR_NODES:
            raise ValidationError(f"has more than {config.MAX_GRAMMAR_NODES} subschemas and enum "
                                  "values, this server's limit (LLMHOST_MAX_GRAMMAR_NODES): "
                                  "compiling it would take too long; send a smaller one")
        props = node.get("properties")
        if isinstance(props, dict):
            required = node.get("required") if isinstance(node.get("required"), list) else []
            optional += len(set(props) - {name for name in required if isinstance(name, str)})
            if config.MAX_GRAMMAR_OPTIONAL and optional > config.MAX_GRAMMAR_OPTIONAL:
                raise ValidationError(
                    f"has more than {config.MAX_GRAMMAR_OPTIONAL} optional properties{at}, this "
                    "server's limit (LLMHOST_MAX_GRAMMAR_OPTIONAL): the grammar grows with their "
                    "square; list more of them in 'required', or send a smaller schema")
        ref = node.get("$ref")
        if isinstance(ref, str) and not _pointer(schema, ref):
            raise ValidationError(f"has the reference {ref!r}{at}, which does not point into this "
                                  "schema (only local references like '#/$defs/name' resolve)")
        if strict:
            found = [key for key in UNENFORCED if key in node]
            if found:
                raise ValidationError(
                    f"uses {', '.join(repr(k) for k in found)}{at}, which strict mode cannot "
                    "enforce (llmhost's grammar library ignores it); remove it or send "
                    "\"strict\": false")
        for key in _SCHEMA:
            if isinstance(node.get(key), dict):
                stack.append((node[key], f"{where}/{key}"))
        for key in _SCHEMA_LISTS:
            if isinstance(node.get(key), list):
                stack.extend((item, f"{where}/{key}/{i}") for i, item in enumerate(node[key]))
        for key in _SCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack.extend((item, f"{where}/{key}/{name}") for name, item in node[key].items())


def check_json_schema(value, what: str = "a JSON Schema", strict: bool = True) -> None:
    """Cheap checks first (bytes, then structure), the metaschema last: it is
    the slow one (seconds for a few hundred KB)."""
    if not isinstance(value, dict):
        raise ValidationError(f"must be {what} (an object)")
    check_size(value)
    check_structure(value, strict)
    # imported by the first request with a schema (about 5 MiB with referencing and rpds)
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    try:
        Draft202012Validator.check_schema(value)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise ValidationError(f"is not a valid JSON Schema: {exc.message}"
                              + (f" (at '{where}')" if where else ""))


class ToolList(fields.List):
    """`tools` / `functions`: their total size (LLMHOST_MAX_TOOLS_BYTES) is
    checked before any tool's schema is, so sixty large tools cost one cheap
    400, not sixty schema checks."""

    def _deserialize(self, value, attr, data, **kwargs):
        limit = settings().MAX_TOOLS_BYTES
        if limit and isinstance(value, list):
            size = _json_bytes(value)
            if size > limit:
                raise ValidationError(f"are {size} bytes as JSON, more than this server's limit "
                                      f"of {limit} bytes for all tools together "
                                      "(LLMHOST_MAX_TOOLS_BYTES); send fewer or smaller tools")
        return super()._deserialize(value, attr, data, **kwargs)


class JsonSchemaSchema(Schema):
    name = fields.String(required=True, validate=NAME)
    description = fields.String(allow_none=True)
    schema_ = fields.Dict(data_key="schema", allow_none=True, metadata={
        "description": "The JSON Schema every answer validates against."})
    strict = fields.Boolean(allow_none=True, metadata={
        "description": "Answers always follow the schema (constrained decoding); `true` also "
                       "refuses keywords the grammar cannot enforce (`not`, `if`, "
                       "`uniqueItems`, ...)."})

    @validates_schema
    def _check(self, data, **kwargs):
        if data.get("schema_") is not None:
            try:
                check_json_schema(data["schema_"], strict=data.get("strict") is True)
            except ValidationError as exc:
                raise ValidationError(exc.messages, "schema")

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
            try:
                check_json_schema(value)
            except ValidationError as exc:
                raise ValidationError(exc.messages, key)
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

    @validates_schema
    def _object_schema(self, data, **kwargs):
        value = data.get("parameters")
        if value is None:
            return
        try:
            check_json_schema(value, "a JSON Schema of type object", strict=data.get("strict") is True)
        except ValidationError as exc:
            raise ValidationError(exc.messages, "parameters")
        if value.get("type", "object") != "object":
            raise ValidationError("must be a JSON Schema of type 'object' (the arguments are a "
                                  f"JSON object), got type {value.get('type')!r}", "parameters")


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
