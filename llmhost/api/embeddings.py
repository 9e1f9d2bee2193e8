"""Embeddings: POST /v1/embeddings."""
from __future__ import annotations

import base64

import numpy as np
import orjson
from flask import Response

from ..config import settings
from ..http.extensions import Blueprint
from ..generation.openai_tokens import to_texts
from .vectors import embed
from ..schemas.embeddings import EmbeddingRequestSchema, EmbeddingResponseSchema

blp = Blueprint("embeddings", __name__, url_prefix="/v1",
                description="Vectors from sentence-embedding models.")


@blp.route("/embeddings", methods=["POST"])
@blp.arguments(EmbeddingRequestSchema)
@blp.response(200, EmbeddingResponseSchema)
@blp.errors(400, 404, 429, 503)
def create_embeddings(args):
    """Create embeddings

    One vector per input, equal to sentence-transformers' `encode` for the model.
    Inputs of concurrent requests share the model's forward passes.
    """
    mode = args.get("token_ids") or settings().EMBED_TOKEN_IDS
    inputs = to_texts(args["input"], mode)  # OpenAI's token ids become text (openai_tokens.py)
    result = embed(args["model"], inputs, args["truncate"], args.get("dimensions"))
    return Response(_body(args["model"], result.vectors, args["encoding_format"], result.prompt_tokens),
                    mimetype="application/json")


def _body(model: str, vectors: np.ndarray, encoding_format: str, prompt_tokens: int) -> bytes:
    """Serialised by orjson straight from the float32 rows, each number in the
    shortest form that reads back as the same float32: for 256 vectors of 384
    numbers the stdlib json module takes about 15x as long and writes twice the
    bytes (every float32 as a 17-digit double)."""
    if encoding_format == "base64":
        rows = [base64.b64encode(row.astype("<f4", copy=False).tobytes()).decode() for row in vectors]
    else:
        rows = list(vectors)
    return orjson.dumps({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }, option=orjson.OPT_SERIALIZE_NUMPY)
