"""/v1/rerank and /v1/score with a tiny cross-encoder built offline: scores
equal sentence-transformers' own CrossEncoder.predict on the same pairs,
results come best first, top_n and return_documents work, and bad input is a
400 naming the field."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from support import assert_error

QUERY = "what is the capital city of france"
DOCS = ["paris is the capital city of france", "the quick brown fox jumps over the lazy dog",
        "python code error request response", "héllo naïve café", "one two three",
        "sea sky blue green red mountain river"]
LONG = "the quick brown fox " * 80   # longer than the model's 128 positions: truncated


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    from llmhost.dev.tinymodels import build_cross_encoder
    return build_cross_encoder(str(tmp_path_factory.mktemp("ce") / "tiny-ce"))


@pytest.fixture(scope="module")
def reference(cross_encoder):
    from sentence_transformers import CrossEncoder
    return CrossEncoder(cross_encoder, device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def client(cross_encoder):
    """A test client whose app loaded the reranker (limits: 8 pairs, 1000 tokens)."""
    from llmhost import create_app
    from llmhost.config import TestConfig
    from llmhost.models.registry import registry

    app = create_app(TestConfig(MAX_RERANK_DOCUMENTS=8, MAX_RERANK_TOKENS=1000))
    client = app.test_client()
    response = client.post("/v1/models", json={"model": cross_encoder, "id": "tiny-ce"})
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["task"] == "rerank"
    yield client
    registry.unload("tiny-ce")


def rerank(client, path="/v1/rerank", **body):
    return client.post(path, json={"model": "tiny-ce", **body})


def pair_tokens(reference, pairs) -> int:
    enc = reference.tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first",
                              max_length=reference.max_seq_length)
    return sum(len(ids) for ids in enc["input_ids"])


def test_rerank_equals_predict(client, reference):
    docs = DOCS + [LONG]
    response = rerank(client, query=QUERY, documents=docs)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    expected = reference.predict([(QUERY, d) for d in docs])
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(docs)))
    got = np.array([r["relevance_score"] for r in sorted(results, key=lambda r: r["index"])])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert [r["index"] for r in results] == list(np.argsort(-expected, kind="stable"))
    assert all(r["document"]["text"] == docs[r["index"]] for r in results)
    tokens = pair_tokens(reference, [(QUERY, d) for d in docs])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert body["model"] == "tiny-ce" and body["id"].startswith("rerank-")


def test_top_n_objects_and_paths(client, reference):
    expected = reference.predict([(QUERY, d) for d in DOCS])
    best = list(np.argsort(-expected, kind="stable")[:2])
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        body = rerank(client, path, query=QUERY, documents=[{"text": d} for d in DOCS], top_n=2,
                      return_documents=False).get_json()
        assert [r["index"] for r in body["results"]] == best, path
        assert all("document" not in r for r in body["results"])
    body = rerank(client, query=QUERY, documents=DOCS, top_n=100).get_json()
    assert len(body["results"]) == len(DOCS)


def test_score_shapes(client, reference):
    one = client.post("/v1/score", json={"model": "tiny-ce", "text_1": QUERY, "text_2": DOCS[0]})
    assert one.status_code == 200, one.get_json()
    body = one.get_json()
    assert body["object"] == "list" and body["data"][0]["object"] == "score"
    np.testing.assert_allclose(body["data"][0]["score"], reference.predict([(QUERY, DOCS[0])])[0],
                               atol=1e-6)
    many = client.post("/v1/score", json={"model": "tiny-ce", "text_1": [QUERY], "text_2": DOCS})
    np.testing.assert_allclose([d["score"] for d in many.get_json()["data"]],
                               reference.predict([(QUERY, d) for d in DOCS]), atol=1e-6)
    pairs = list(zip(DOCS[:3], DOCS[3:]))
    zipped = client.post("/v1/score", json={"model": "tiny-ce", "text_1": DOCS[:3], "text_2": DOCS[3:]})
    body = zipped.get_json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    np.testing.assert_allclose([d["score"] for d in body["data"]], reference.predict(pairs), atol=1e-6)
    assert body["usage"]["prompt_tokens"] == pair_tokens(reference, pairs)
    assert_error(client.post("/v1/score", json={"model": "tiny-ce", "text_1": DOCS[:2],
                                                "text_2": DOCS[:3]}), 400, "text_2")


def test_concurrent_requests_share_batches(client, reference):
    queries = [QUERY, "blue sky", "python error", "café"]
    with ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda q: rerank(client, query=q, documents=DOCS).get_json(), queries * 2))
    for q, body in zip(queries * 2, bodies):
        got = {r["index"]: r["relevance_score"] for r in body["results"]}
        np.testing.assert_allclose([got[i] for i in range(len(DOCS))],
                                   reference.predict([(q, d) for d in DOCS]), atol=1e-6)


@pytest.mark.parametrize("body, param", [
    ({"documents": DOCS}, "query"),
    ({"query": QUERY}, "documents"),
    ({"query": QUERY, "documents": []}, "documents"),
    ({"query": QUERY, "documents": ["a", 3]}, "documents"),
    ({"query": QUERY, "documents": [{"title": "a"}]}, "documents"),
    ({"query": QUERY, "documents": DOCS, "top_n": 0}, "top_n"),
    ({"query": QUERY, "documents": DOCS, "return_documents": "yes"}, "return_documents"),
    ({"query": QUERY, "documents": DOCS * 2}, "documents"),              # 12 > 8 documents
    ({"query": QUERY, "documents": [LONG] * 8}, "documents"),            # 8 x 128 > 1000 tokens
    ({"query": 3, "documents": DOCS}, "query"),
])
def test_bad_rerank_requests(client, body, param):
    assert_error(rerank(client, **body), 400, param)


def test_wrong_models(client):
    assert_error(rerank(client, model="nope", query=QUERY, documents=DOCS), 404, "model")
    assert_error(client.post("/v1/embeddings", json={"model": "tiny-ce", "input": "x"}), 400, "model")
    assert_error(client.post("/v1/score", json={"model": "tiny-ce", "text_1": [], "text_2": "a"}),
                 400, "text_1")
