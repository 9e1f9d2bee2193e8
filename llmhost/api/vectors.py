"""Running embeddings for a request: POST /v1/embeddings and Ollama's
/api/embed and /api/embeddings run this one path. Not a blueprint."""
from __future__ import annotations

from ..engine import metrics
from ..http import checks
from ..http.observability import log_fields
from .access import use_model


def embed(model_id: str, inputs: list, truncate: bool, dimensions: int | None = None):
    """(served model id, the engine's result: `.vectors`, `.prompt_tokens`)."""
    with use_model(model_id, task="embed") as entry:
        inputs = checks.embedding_inputs(entry, inputs, truncate)
        result = entry.engine.embed(inputs, truncate=truncate, dimensions=dimensions)
    metrics.record_tokens(entry.id, result.prompt_tokens, 0)
    log_fields().update(model=entry.id, prompt_tokens=result.prompt_tokens)
    return entry.id, result
