"""The Api, Blueprint and Schema every module uses, subclassed once here."""
from __future__ import annotations

import logging

import flask_smorest
import marshmallow as ma
from webargs import core
from webargs.flaskparser import FlaskParser

from . import errors, checks, limits

log = logging.getLogger("llmhost")
_ignored_logged: set[str] = set()
MAX_LOGGED_UNKNOWN = 256   # distinct unknown field names logged (and remembered) per process


_OPENAPI_EXTRA: dict[str, dict] = {}   # component name -> Schema.OPENAPI (see Api)


class Schema(ma.Schema):
    """Request schemas accept and ignore fields OpenAI clients send that we do not
    know (logged once per field), so new SDK versions never break on a 4xx.
    `OPENAPI`: schema-level keywords for the document that fields cannot say
    (``oneOf`` of required fields)."""

    OPENAPI: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("OPENAPI"):
            _OPENAPI_EXTRA[cls.__name__.removesuffix("Schema")] = cls.OPENAPI

    class Meta:
        unknown = ma.EXCLUDE
        ordered = True

    @ma.pre_load
    def _strict_booleans(self, data, **kwargs):
        """Booleans are JSON true/false, as the OpenAPI document says:
        marshmallow alone would also take 0, 1, "yes" or "off"."""
        if isinstance(data, dict):
            for name, field in self.fields.items():
                key = field.data_key or name
                value = data.get(key)
                if isinstance(field, ma.fields.Boolean) and value is not None \
                        and not isinstance(value, bool):
                    raise ma.ValidationError({key: ["Not a valid boolean: use true or false."]})
        return data

    @ma.pre_load
    def _log_unknown(self, data, **kwargs):
        if isinstance(data, dict):
            known = {field.data_key or name for name, field in self.fields.items()}
            for key in set(data) - known:   # wire names (response_format's `schema`)
                name = f"{type(self).__name__}.{key}"
                if name not in _ignored_logged:
                    if len(_ignored_logged) >= MAX_LOGGED_UNKNOWN:
                        break   # bounded: random field names must not grow memory or logs
                    _ignored_logged.add(name)
                    log.info("ignoring unknown field %r in %s%s", str(key)[:100], type(self).__name__,
                             "" if len(_ignored_logged) < MAX_LOGGED_UNKNOWN else
                             " (the last one logged: llmhost logs at most "
                             f"{MAX_LOGGED_UNKNOWN} unknown field names)")
        return data


class ErrorDetailSchema(ma.Schema):
    message = ma.fields.String(required=True)
    type = ma.fields.String(required=True)
    param = ma.fields.String(allow_none=True, required=True)
    code = ma.fields.String(allow_none=True, required=True)


class ErrorResponseSchema(ma.Schema):
    """The OpenAI error envelope."""

    error = ma.fields.Nested(ErrorDetailSchema, required=True)


class AnthropicErrorDetailSchema(ma.Schema):
    type = ma.fields.String(required=True)
    message = ma.fields.String(required=True)


class AnthropicErrorSchema(ma.Schema):
    """Anthropic's error envelope (the Messages API routes)."""

    type = ma.fields.String(required=True, metadata={"enum": ["error"]})
    error = ma.fields.Nested(AnthropicErrorDetailSchema, required=True)


class OllamaErrorSchema(ma.Schema):
    """Ollama's error shape (the /api routes)."""

    error = ma.fields.String(required=True)


# The error body each blueprint answers (http/errors.py picks it by blueprint too).
ERROR_SCHEMAS = {"anthropic": AnthropicErrorSchema, "ollama": OllamaErrorSchema}


class Parser(FlaskParser):
    """Validation errors are 400s (OpenAI), and a body that is not JSON is refused
    instead of being read as an empty object."""

    DEFAULT_VALIDATION_STATUS = 400

    def _raw_load_json(self, req):
        raw = limits.request_body(req)
        # Ollama's clients (and its docs' `curl -d`) send JSON without a JSON content type.
        if not core.is_json(req.mimetype) and req.blueprint != "ollama":
            if raw:
                raise errors.APIError(
                    415, "Request body must be JSON: send 'Content-Type: application/json'.")
            return core.missing
        try:
            data = core.parse_json(raw)
        except RecursionError:
            raise checks.too_deep(raw)
        checks.check_json(raw, data)
        return data

    def _handle_invalid_json_error(self, error, req, *args, **kwargs):
        raise errors.APIError(400, f"We could not parse the JSON body of your request ({error}). "
                                   "Send a valid JSON object.")


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = Parser()

    def arguments(self, schema, **kwargs):
        kwargs.setdefault("error_status_code", 400)
        return super().arguments(schema, **kwargs)

    def errors(self, *statuses: int):
        """Document these statuses (and 401, which every /v1 route answers once
        keys are set) as the error envelope of this blueprint's API (OpenAI's,
        or Anthropic's and Ollama's on theirs)."""
        schema = ERROR_SCHEMAS.get(self.name, ErrorResponseSchema)

        def decorator(func):
            for status in sorted({401, *statuses}, reverse=True):
                func = self.alt_response(status, schema=schema)(func)
            return func
        return decorator


class Api(flask_smorest.Api):
    ERROR_SCHEMA = ErrorResponseSchema

    def register_blueprint(self, blp, **options):
        super().register_blueprint(blp, **options)
        for name, extra in _OPENAPI_EXTRA.items():
            if name in self.spec.components.schemas:
                self.spec.components.schemas[name].update(extra)

    def _register_error_handlers(self):
        errors.init_app(self._app)

