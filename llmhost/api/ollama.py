"""Ollama's API under /api: chat and generate (NDJSON streams by default),
embed and embeddings, tags, show, ps, version, pull and delete.

Chat and generate are a translation onto the chat path (generation/ollama.py,
api/chatpath.py); embeddings run api/vectors.py; pull loads through the same
path as POST /v1/models (api/loads.py) with Ollama's status lines. Errors on
these routes come in Ollama's shape, ``{"error": "..."}`` (http/errors.py
picks it by this blueprint); keys are sent as bearer tokens, as Ollama's
clients do."""
from __future__ import annotations

import time

import orjson
from flask import Response, jsonify

from ..generation import ollama
from ..generation.prompt import template_for
from ..http import redact, sse
from ..http.errors import invalid
from ..http.extensions import Blueprint
from ..models.loading import LoadSpec
from ..models.registry import registry
from ..schemas.ollama import ChatSchema, EmbeddingsSchema, EmbedSchema, GenerateSchema, ModelNameSchema, PullSchema, StatusSchema
from ..version import __version__
from .access import resolve, use_model
from .chatpath import relay, start_chat
from .loads import load, load_events
from .vectors import embed

blp = Blueprint("ollama", __name__, url_prefix="/api",
                description="Ollama's API, on the same models and chat path.")


def _answer(args: dict, generate: bool):
    began = time.perf_counter()
    started = start_chat(ollama.chat_body(args))
    builder = ollama.ReplyBuilder(args["model"], generate, began)
    chunks = relay(started, [], builder.feed, lambda finish, run: builder.end(
        finish, run.prompt_tokens, run.completion_tokens))
    if args["stream"]:
        return sse.ndjson(chunks)
    return jsonify(builder.reply(list(chunks)))


@blp.route("/chat", methods=["POST"])
@blp.arguments(ChatSchema)
@blp.response(200, description="NDJSON chunks (`done: false`, then one `done: true` with the "
                               "timings), or one object with `stream: false`.")
@blp.errors(400, 404, 429, 503)
def chat(args):
    """Chat (Ollama API)

    Run as the chat request it translates to: tools, `format` (a grammar) and
    `options` are /v1/chat/completions' own.
    """
    return _answer(args, generate=False)


@blp.route("/generate", methods=["POST"])
@blp.arguments(GenerateSchema)
@blp.response(200, description="NDJSON chunks with `response`, or one object.")
@blp.errors(400, 404, 429, 503)
def generate(args):
    """Generate (Ollama API)

    The prompt (and `system`) rendered with the model's chat template; an
    empty prompt only checks that the model is loaded.
    """
    if not args["prompt"]:
        with use_model(args["model"], task="generate"):
            pass
        return jsonify({"model": args["model"], "created_at": ollama.timestamp(),
                        "response": "", "done": True, "done_reason": "load"})
    return _answer(args, generate=True)


def _texts(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise invalid("Invalid value for 'input': must be a string or a non-empty list of strings.",
                  param="input")


@blp.route("/embed", methods=["POST"])
@blp.arguments(EmbedSchema)
@blp.response(200, description="`embeddings`: one vector per input.")
@blp.errors(400, 404, 429, 503)
def embed_texts(args):
    """Embed (Ollama API)"""
    began = time.perf_counter()
    result = embed(args["model"], _texts(args["input"]), args["truncate"],
                      args.get("dimensions"))
    return Response(orjson.dumps({
        "model": args["model"], "embeddings": list(result.vectors),
        "total_duration": int((time.perf_counter() - began) * 1e9), "load_duration": 0,
        "prompt_eval_count": result.prompt_tokens}, option=orjson.OPT_SERIALIZE_NUMPY),
        mimetype="application/json")


@blp.route("/embeddings", methods=["POST"])
@blp.arguments(EmbeddingsSchema)
@blp.response(200, description="`embedding`: the prompt's vector (Ollama's older route).")
@blp.errors(400, 404, 429, 503)
def embeddings(args):
    """Embed one prompt (Ollama's older API)"""
    result = embed(args["model"], [args["prompt"]], True)
    return Response(orjson.dumps({"embedding": result.vectors[0]},
                                 option=orjson.OPT_SERIALIZE_NUMPY), mimetype="application/json")


@blp.route("/tags", methods=["GET"])
@blp.response(200, description="`models`: the loaded models.")
@blp.errors()
def tags():
    """List models (Ollama API)"""
    return {"models": [ollama.model_card(entry) for entry in registry.list()]}


@blp.route("/ps", methods=["GET"])
@blp.response(200, description="`models`: the loaded models, with memory and expiry.")
@blp.errors()
def running():
    """List running models (Ollama API)"""
    models = []
    for entry in registry.list():
        card = ollama.model_card(entry)
        card["size_vram"] = entry.loaded.memory_bytes if entry.loaded.device.startswith("cuda") \
            else 0
        card["context_length"] = entry.loaded.max_context
        if entry.spec.keep_alive:
            idle = time.monotonic() - entry.last_used
            card["expires_at"] = ollama.timestamp(time.time() + entry.spec.keep_alive - idle)
        del card["modified_at"]
        models.append(card)
    return {"models": models}


@blp.route("/show", methods=["POST"])
@blp.arguments(ModelNameSchema)
@blp.response(200, description="The model's template, details, model_info and capabilities.")
@blp.errors(400, 404)
def show(args):
    """Show a model (Ollama API)"""
    entry = registry.get(resolve(args["model"]))
    card = ollama.model_card(entry)
    family = card["details"]["family"]
    generates = entry.task == "generate"
    template = (template_for(entry) or getattr(entry.tokenizer, "chat_template", "") or "") \
        if generates else ""
    info = {"general.architecture": family, "general.parameter_count": entry.loaded.parameters,
            f"{family or 'model'}.context_length": entry.loaded.max_context}
    return {"modelfile": "", "parameters": "", "template": template if isinstance(template, str)
            else "", "details": card["details"], "model_info": info,
            "capabilities": ["completion", "tools"] if generates else ["embedding"],
            "modified_at": card["modified_at"]}


@blp.route("/version", methods=["GET"])
@blp.response(200, description="`version`: llmhost's version.")
@blp.errors()
def version():
    """Server version (Ollama API)"""
    return {"version": __version__}


def _status(event: dict) -> dict:
    """A load progress event (api/loads.py) as Ollama's pull status line."""
    if event.get("object") != "model.load.progress":
        return {"status": "success"}
    name = event["id"]
    if event.get("download_total_bytes"):
        return {"status": f"pulling {ollama.digest(name)[:12]}",
                "digest": "sha256:" + ollama.digest(name),
                "total": event["download_total_bytes"], "completed": event["downloaded_bytes"]}
    if event.get("total_tensors"):
        return {"status": f"loading {redact.label(name) if redact.is_path(name) else name}",
                "digest": "sha256:" + ollama.digest(name),
                "total": event["total_tensors"], "completed": event["loaded_tensors"]}
    return {"status": event.get("phase") or "loading"}


@blp.route("/pull", methods=["POST"])
@blp.arguments(PullSchema)
@blp.doc(responses={200: {"content": {"application/x-ndjson": {"schema": {"type": "object"}}}}})
@blp.response(200, StatusSchema, description="NDJSON status lines while the model loads, "
              "ending with `{\"status\": \"success\"}`; one such object with `stream: false`.")
@blp.errors(400, 403, 404, 409, 503, 507)
def pull(args):
    """Pull (load) a model (Ollama API)

    Loads through the same path as POST /v1/models: a hub id (from the cache,
    or downloaded where the server allows), a local folder or a .gguf file.
    """
    spec = LoadSpec(model=args["model"])
    options = {"model": args["model"]}
    if not args["stream"]:
        load(spec, options)
        return {"status": "success"}
    events = load_events(spec, options)
    return sse.ndjson(_pull_lines(events))


def _pull_lines(events):
    yield {"status": "pulling manifest"}
    for event in events:
        yield _status(event)


@blp.route("/delete", methods=["DELETE"])
@blp.arguments(ModelNameSchema)
@blp.response(200, description="Empty: the model was unloaded.")
@blp.errors(400, 404)
def delete(args):
    """Delete (unload) a model (Ollama API)

    Frees its memory; files on disk are kept.
    """
    registry.unload(args["model"])
    return Response(status=200)
