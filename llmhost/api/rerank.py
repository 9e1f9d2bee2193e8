"""Reranking and pair scores with cross-encoders: POST /v1/rerank (also
/rerank and /v2/rerank: Jina's, Cohere's and vLLM's paths) and POST /v1/score
(vLLM's)."""
from __future__ import annotations

import time
import uuid

from flask import jsonify

from ..engine import metrics
from ..http import checks
from ..http.errors import invalid
from ..http.extensions import Blueprint
from ..http.observability import log_fields
from ..schemas.rerank import (RerankRequestSchema, RerankResponseSchema, ScoreRequestSchema,
                              ScoreResponseSchema)
from .access import use_model

blp = Blueprint("rerank", __name__, description="Rerank documents and score text pairs with "
                                                "cross-encoders.")


@blp.route("/v1/rerank", methods=["POST"], endpoint="rerank_v1")
@blp.route("/v2/rerank", methods=["POST"], endpoint="rerank_v2")
@blp.route("/rerank", methods=["POST"], endpoint="rerank")
@blp.arguments(RerankRequestSchema)
@blp.response(200, RerankResponseSchema)
@blp.errors(400, 404, 429, 503)
def rerank(args):
    """Rerank documents

    Scores every document against `query` with a cross-encoder (equal to
    sentence-transformers' `CrossEncoder.predict`) and answers them best first.
    """
    docs = args["documents"]
    model, result = _score(args["model"], [args["query"]] * len(docs), docs, "documents")
    order = sorted(range(len(docs)), key=lambda i: -result.scores[i])[:args.get("top_n") or None]
    results = []
    for i in order:
        item = {"index": i, "relevance_score": float(result.scores[i])}
        if args["return_documents"]:
            item["document"] = {"text": docs[i]}
        results.append(item)
    return jsonify({"id": f"rerank-{uuid.uuid4().hex}", "model": model, "results": results,
                    "usage": _usage(result.prompt_tokens)})


@blp.route("/v1/score", methods=["POST"], endpoint="score")
@blp.arguments(ScoreRequestSchema)
@blp.response(200, ScoreResponseSchema)
@blp.errors(400, 404, 429, 503)
def score(args):
    """Score text pairs

    `text_1` against `text_2`: one against one, one against many, or many
    against as many (pairwise), as vLLM's /v1/score.
    """
    first, second = args["text_1"], args["text_2"]
    if len(first) == 1:
        first = first * len(second)
    elif len(first) != len(second):
        raise invalid(f"'text_1' holds {len(first)} texts and 'text_2' {len(second)}: send one "
                      "text_1, or as many as text_2 (scored pairwise).", param="text_2")
    model, result = _score(args["model"], first, second, "text_2")
    return jsonify({"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                    "model": model, "usage": _usage(result.prompt_tokens),
                    "data": [{"index": i, "object": "score", "score": float(s)}
                             for i, s in enumerate(result.scores)]})


def _score(model_id: str, first: list[str], second: list[str], param: str):
    with use_model(model_id, task="rerank") as entry:
        # A text far longer than the model reads is cut to the characters that can
        # still matter before the tokenizer sees it (the pair is truncated anyway).
        first = checks.embedding_inputs(entry, first, truncate=True)
        second = checks.embedding_inputs(entry, second, truncate=True)
        result = entry.engine.score(list(zip(first, second)), param)
    metrics.record_tokens(entry.id, result.prompt_tokens, 0)
    log_fields().update(model=entry.id, prompt_tokens=result.prompt_tokens)
    return entry.id, result


def _usage(tokens: int) -> dict:
    return {"prompt_tokens": tokens, "total_tokens": tokens}
