"""Running embeddings for a request: POST /v1/embeddings and Ollama's
/api/embed and /api/embeddings run this one path. Not a blueprint."""
from __future__ import annotations

from ..engine import metrics
from ..http import checks, metering
from ..http.observability import log_fields
from .access import use_model


def embed(model_id: str, texts: list, truncate: bool, dimensions: int | None = None):
    """The engine's result (`.vectors`, `.prompt_tokens`) for `texts` on the
    model `model_id` names (an alias too)."""
    with use_model(model_id, task="embed") as entry:
        texts = checks.embedding_inputs(entry, texts, truncate)
        metering.admit_tokens(len(texts))  # at least a token each; settled to the real count
        result = entry.engine.embed(texts, truncate=truncate, dimensions=dimensions)
    metrics.record_tokens(entry.id, result.prompt_tokens, 0)
    metering.add(prompt_tokens=result.prompt_tokens)
    log_fields().update(model=entry.id, prompt_tokens=result.prompt_tokens)
    return result
