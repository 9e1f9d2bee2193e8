"""Token-id embeddings input in OpenAI's tokenization (tiktoken cl100k_base), as
LangChain's default OpenAIEmbeddings sends it, against all-MiniLM-L6-v2."""
from __future__ import annotations

import numpy as np
import pytest
import requests

from support import validate

TEXTS = ["The food was delicious and the waiter was friendly.",
         "Le repas était délicieux.",
         "Quantum entanglement links the states of two particles, whatever the distance."]


@pytest.fixture(scope="module")
def minilm(server, minilm_dir) -> str:
    server.load(minilm_dir, id="text-embedding-3-small")
    return "text-embedding-3-small"


def _cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _strings(server, model, texts) -> np.ndarray:
    r = requests.post(server.url + "/v1/embeddings", json={"model": model, "input": texts},
                      timeout=120)
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in validate(r.json(), "CreateEmbeddingResponse")["data"]])


def test_langchain_default_openai_embeddings(server, minilm):
    """LangChain's OpenAIEmbeddings with its defaults posts cl100k_base token ids:
    the vectors equal those of the same texts sent as strings."""
    from langchain_openai import OpenAIEmbeddings

    from llmhost.generation.openai_tokens import ensure_offline

    ensure_offline()  # the client's tiktoken needs the file too (no network here)
    sent = []
    client = OpenAIEmbeddings(model=minilm, base_url=server.url + "/v1", api_key="unused",
                              max_retries=0)
    assert client.check_embedding_ctx_length  # the default: texts go as token ids
    original = client.client.create

    def spy(**kwargs):
        sent.append(kwargs["input"])
        return original(**kwargs)

    client.client.create = spy
    got = client.embed_documents(TEXTS)
    assert sent and all(isinstance(item, list) and all(isinstance(t, int) for t in item)
                        for batch in sent for item in batch), sent
    assert _cosines(got, _strings(server, minilm, TEXTS)).min() >= 0.999
    query = client.embed_query(TEXTS[2])
    assert _cosines([query], _strings(server, minilm, TEXTS[2:])).min() >= 0.999


def test_token_ids_decoded_with_tiktoken(server, minilm):
    import tiktoken

    from llmhost.generation.openai_tokens import ensure_offline

    ensure_offline()
    ids = [tiktoken.get_encoding("cl100k_base").encode(t) for t in TEXTS]
    r = requests.post(server.url + "/v1/embeddings", json={"model": minilm, "input": ids}, timeout=120)
    assert r.status_code == 200, r.text
    got = [d["embedding"] for d in validate(r.json(), "CreateEmbeddingResponse")["data"]]
    assert _cosines(got, _strings(server, minilm, TEXTS)).min() >= 0.999
    # The same numbers read as MiniLM's own ids are another text: far from it, and only on request.
    r = requests.post(server.url + "/v1/embeddings",
                      json={"model": minilm, "input": ids[:1], "token_ids": "model"}, timeout=120)
    if r.status_code == 200:
        other = [r.json()["data"][0]["embedding"]]
        assert _cosines(other, _strings(server, minilm, TEXTS[:1]))[0] < 0.9
    else:
        assert r.status_code == 400, r.text  # an id past MiniLM's 30522 tokens


def test_server_setting_reads_model_ids(tiny_models, minilm_dir):
    """LLMHOST_EMBED_TOKEN_IDS=model: token ids are the model's own by default."""
    from llmhost import create_app
    from llmhost.config import TestConfig
    from llmhost.models.registry import registry

    client = create_app(TestConfig(EMBED_TOKEN_IDS="model")).test_client()
    r = client.post("/v1/models", json={"model": minilm_dir, "id": "minilm-model-ids"})
    assert r.status_code in (200, 201), r.get_json()
    try:
        too_big = client.post("/v1/embeddings", json={"model": "minilm-model-ids", "input": [40000]})
        assert too_big.status_code == 400 and "vocabulary" in too_big.get_json()["error"]["message"]
        as_cl100k = client.post("/v1/embeddings", json={"model": "minilm-model-ids", "input": [40000],
                                                        "token_ids": "cl100k_base"})
        assert as_cl100k.status_code == 200, as_cl100k.get_json()
    finally:
        registry.unload("minilm-model-ids")
