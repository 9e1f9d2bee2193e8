"""Model lifecycle: load, list, retrieve, unload."""
from .. import journal, redact
from ..config import settings
from ..extensions import Blueprint
from ..loading import LoadSpec, cached_models
from ..registry import registry
from ..schemas.models import (DeletedModelSchema, ListModelsQuerySchema, ListModelsSchema,
                              LoadModelSchema, ModelSchema)

blp = Blueprint("models", __name__, url_prefix="/v1", description="Load, list and unload models.")


@blp.route("/models", methods=["POST"])
@blp.arguments(LoadModelSchema)
@blp.response(201, ModelSchema, description="Loaded now.")
@blp.alt_response(200, schema=ModelSchema, description="Already loaded with these options.")
@blp.errors(400, 403, 404, 409, 503, 507)
def load_model(args):
    """Load a model

    From a Hugging Face hub id (cached models load offline), a local folder or a
    GGUF file. Answers 201 when it loaded now, 200 when it was already loaded.
    """
    entry, created = registry.load(LoadSpec(**args), settings())
    if created:
        journal.record(args, entry.id)   # reloaded if the worker crashes
    return _shown(entry.to_openai()), 201 if created else 200


def _shown(model: dict) -> dict:
    """`source` is a server path for models loaded from disk: admins only."""
    if redact.is_path(model.get("source")) and not redact.may_see_paths():
        model = {**model, "source": redact.label(model["source"])}
    return model


@blp.route("/models", methods=["GET"])
@blp.arguments(ListModelsQuerySchema, location="query")
@blp.response(200, ListModelsSchema)
@blp.errors(400)
def list_models(args):
    """List models

    The loaded models; with `include=cached`, also the models in the local
    Hugging Face cache that can be loaded offline (status `cached`).
    """
    data = [_shown(entry.to_openai()) for entry in registry.list()]
    if args.get("include") == "cached":
        loaded = {d["id"] for d in data}
        data += [{"id": c["id"], "object": "model", "created": c["created"], "owned_by": "huggingface",
                  "status": "cached", "revision": c["revision"], "size_on_disk": c["size_on_disk"]}
                 for c in cached_models() if c["id"] not in loaded]
    return {"object": "list", "data": data}


@blp.route("/models/<path:model_id>", methods=["GET"])
@blp.response(200, ModelSchema)
@blp.errors(404)
def retrieve_model(model_id):
    """Retrieve a loaded model"""
    return _shown(registry.get(model_id).to_openai())


@blp.route("/models/<path:model_id>", methods=["DELETE"])
@blp.response(200, DeletedModelSchema)
@blp.errors(404)
def unload_model(model_id):
    """Unload a model

    Frees its memory (CPU RAM and CUDA cache); the Hugging Face disk cache is kept.
    Requests still running on it end with an error.
    """
    return {"id": registry.unload(model_id).id, "object": "model", "deleted": True}
