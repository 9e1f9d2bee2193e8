"""Model lifecycle: load, list, retrieve, unload."""
from ..models import progress
from ..http import redact, sse
from ..config import settings
from ..http.extensions import Blueprint
from ..models.loading import LoadSpec
from ..models.ondisk import cached_models, local_models
from ..models.registry import registry
from .access import aliases, resolve
from .loads import load, load_events
from ..schemas.models import (DeletedModelSchema, ListModelsQuerySchema, ListModelsSchema,
                              LoadModelSchema, ModelSchema, UnloadModelQuerySchema)

blp = Blueprint("models", __name__, url_prefix="/v1", description="Load, list and unload models.")


@blp.route("/models", methods=["POST"])
@blp.arguments(LoadModelSchema)
@blp.response(201, ModelSchema, description="Loaded now.")
@blp.alt_response(200, schema=ModelSchema, description="Already loaded with these options.")
@blp.doc(responses={200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "description": "`stream: true`: a progress event or, last, the Model "
                                         "as JSON, then `[DONE]`."}}}}}}})
@blp.errors(400, 403, 404, 409, 503, 507)
def load_model(args):
    """Load a model

    From a Hugging Face hub id (cached models load offline), a local folder or a
    GGUF file. Answers 201 when it loaded now, 200 when it was already loaded.
    With `stream: true`, server-sent events of the load's progress come first.
    """
    stream = args.pop("stream", False)
    spec = LoadSpec(**args)
    if stream:
        may_see = redact.may_see_paths()
        return sse.stream(_shown(event, may_see) for event in load_events(spec, args))
    entry, created = load(spec, args)
    return _shown(entry.to_openai()), 201 if created else 200


def _shown(model: dict, may_see: bool | None = None) -> dict:
    """`source` is a server path for models loaded from disk: admins only."""
    if may_see is None:
        may_see = redact.may_see_paths()
    if redact.is_path(model.get("source")) and not may_see:
        model = {**model, "source": redact.label(model["source"])}
    return model


@blp.route("/models", methods=["GET"])
@blp.arguments(ListModelsQuerySchema, location="query")
@blp.response(200, ListModelsSchema)
@blp.errors(400)
def list_models(args):
    """List models

    The loaded models and those loading (`status: loading`, with their progress);
    with `include=cached`, also what loads offline (status `cached`): models in the
    local Hugging Face cache, and `.gguf` files and model folders under
    LLMHOST_MODEL_DIRS.
    """
    data = [entry.to_openai() for entry in registry.list()]
    names = aliases()
    for model in data:
        model["aliases"] = sorted(a for a, target in names.items() if target == model["id"])
    created = {model["id"]: model["created"] for model in data}
    data += [{"id": alias, "object": "model", "created": created.get(target, 0),
              "owned_by": "llmhost", "status": "loaded", "alias_of": target}
             for alias, target in sorted(names.items())]
    seen = {d["id"] for d in data}
    data += [t.to_dict() for t in progress.active() if t.id not in seen]
    if args.get("include") == "cached":
        seen = {d["id"] for d in data} | {d.get("source") for d in data}
        data += [{"id": c["id"], "object": "model", "created": c["created"], "owned_by": "huggingface",
                  "status": "cached", "format": "hub", "revision": c["revision"],
                  "size_on_disk": c["size_on_disk"]}
                 for c in cached_models() if c["id"] not in seen]
        if redact.may_see_paths():   # their ids are server paths, only for loading them
            data += [m for m in local_models(settings().MODEL_DIRS) if m["id"] not in seen]
    return {"object": "list", "data": [_shown(d) for d in data]}


@blp.route("/models/<path:model_id>", methods=["GET"])
@blp.response(200, ModelSchema)
@blp.errors(404, 503)
def retrieve_model(model_id):
    """Retrieve a loaded model

    200 only for a model this server serves now: one still loading answers 503
    with Retry-After (its progress is in GET /v1/models), so a router that
    checks this never sends traffic too early.
    """
    return _shown(registry.get(resolve(model_id)).to_openai())


@blp.route("/models/<path:model_id>", methods=["DELETE"])
@blp.arguments(UnloadModelQuerySchema, location="query")
@blp.response(200, DeletedModelSchema)
@blp.errors(404, 409)
def unload_model(args, model_id):
    """Unload a model

    Frees its memory (CPU RAM and CUDA cache); the Hugging Face disk cache is kept.
    Requests still running on it end with an error. A base model with LoRA
    adapters loaded onto it answers 409 unless `force=true`.
    """
    entry = registry.unload(model_id, force=args["force"])
    return {"id": entry.id, "object": "model", "deleted": True}
