"""Embeddings with the real all-MiniLM-L6-v2: vectors equal sentence-transformers'
own encode, every bad input is an envelope, and concurrent requests share batches."""
import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from llmhost.http.errors import from_engine
from support import assert_error, validate, wait_for

SENTENCES = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Ünïcödé façade: naïve café crème brûlée.",
    "日本語の文章をベクトルに変換します。",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم",
    "🚀 launch day 🎉",
    "x",
]
LONG = "embedding " * 300  # about 600 tokens: more than MiniLM's 256


@pytest.fixture(scope="module")
def reference(minilm_dir):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(minilm_dir, device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def minilm(server, minilm_dir):
    server.load(minilm_dir, id="minilm")
    yield "minilm"
    requests.delete(server.url + "/v1/models/minilm", timeout=60)


def embed(server, **body):
    return requests.post(server.url + "/v1/embeddings", json={"model": "minilm", **body}, timeout=300)


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return validate(response.json(), "CreateEmbeddingResponse")


def vectors(body) -> np.ndarray:
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float32)


def assert_close(got, expected) -> None:
    got, expected = np.atleast_2d(got), np.atleast_2d(expected)
    assert got.shape == expected.shape
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.9999, cosine


def token_count(reference, texts) -> int:
    return sum(len(ids) for ids in reference.tokenizer(texts)["input_ids"])


# -- through gunicorn -----------------------------------------------------------

def test_vectors_equal_encode(server, minilm, reference):
    body = ok(embed(server, input=SENTENCES, user="someone"))
    assert body["model"] == "minilm" and body["object"] == "list"
    got = vectors(body)
    assert got.shape == (len(SENTENCES), 384)
    assert_close(got, reference.encode(SENTENCES))
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)  # the model's Normalize module
    tokens = token_count(reference, SENTENCES)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_single_string(server, minilm, reference):
    body = ok(embed(server, input=SENTENCES[2]))
    assert len(body["data"]) == 1
    assert_close(vectors(body), reference.encode(SENTENCES[2]))
    assert body["usage"]["prompt_tokens"] == token_count(reference, [SENTENCES[2]])


def test_base64_is_the_float_vector(server, minilm):
    floats = vectors(ok(embed(server, input=SENTENCES[:3])))
    r = embed(server, input=SENTENCES[:3], encoding_format="base64")
    assert r.status_code == 200, r.text
    body = r.json()
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                        for d in body["data"]])
    assert decoded.shape == (3, 384)
    # The official schema only knows float arrays: check the rest of the body with the vectors decoded.
    validate({**body, "data": [{**d, "embedding": v.tolist()} for d, v in zip(body["data"], decoded)]},
             "CreateEmbeddingResponse")
    assert np.array_equal(decoded, floats)


def test_token_id_input(server, minilm, reference):
    """The model's own ids, with the per-request extra (OpenAI's ids are the
    default: tests/test_embeddings_tiktoken.py)."""
    ids = reference.tokenizer(SENTENCES[:2], add_special_tokens=False)["input_ids"]
    expected = reference.encode(SENTENCES[:2])
    single = ok(embed(server, input=ids[0], token_ids="model"))
    assert_close(vectors(single), expected[0])
    assert single["usage"]["prompt_tokens"] == len(ids[0]) + 2  # [CLS] and [SEP]
    assert_close(vectors(ok(embed(server, input=ids, token_ids="model"))), expected)


def test_dimensions(server, minilm, reference):
    body = ok(embed(server, input=SENTENCES[:4], dimensions=64))
    got = vectors(body)
    assert got.shape == (4, 64)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    expected = reference.encode(SENTENCES[:4])[:, :64]
    assert_close(got, expected / np.linalg.norm(expected, axis=1, keepdims=True))
    assert vectors(ok(embed(server, input="x", dimensions=384))).shape == (1, 384)


def test_openai_client(openai_client, minilm, reference):
    result = openai_client.embeddings.create(model=minilm, input=SENTENCES)  # SDK asks for base64
    assert [d.index for d in result.data] == list(range(len(SENTENCES)))
    assert_close(np.array([d.embedding for d in result.data]), reference.encode(SENTENCES))
    assert result.usage.prompt_tokens == token_count(reference, SENTENCES)
    short = openai_client.embeddings.create(model=minilm, input="hello", dimensions=32,
                                            encoding_format="float")
    assert len(short.data[0].embedding) == 32


def test_over_length_refused_or_truncated(server, minilm, reference):
    err = assert_error(embed(server, input=["short", LONG]), 400, "input")
    assert "input[1]" in err["message"] and "256" in err["message"] and "truncate" in err["message"]
    body = ok(embed(server, input=["short", LONG], truncate=True))
    assert_close(vectors(body), reference.encode(["short", LONG]))  # encode cuts at 256 too
    assert body["usage"]["prompt_tokens"] == 3 + 256
    long_ids = reference.tokenizer(LONG, add_special_tokens=False)["input_ids"]
    assert_error(embed(server, input=long_ids, token_ids="model"), 400, "input")
    assert_close(vectors(ok(embed(server, input=long_ids, truncate=True, token_ids="model"))),
                 reference.encode(LONG))


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["a", ""]}, "input"),
    ({"input": [[1, 2], []]}, "input"),
    ({"input": ["a", 5]}, "input"),
    ({"input": [1.5, 2]}, "input"),
    ({"input": [True]}, "input"),
    ({"input": {"text": "a"}}, "input"),
    ({"input": None}, "input"),
    ({"input": [30522], "token_ids": "model"}, "input"),  # vocabulary is 0..30521
    ({"input": [100262]}, "input"),       # not a cl100k_base token
    ({"input": [5], "token_ids": "gpt2"}, "token_ids"),
    ({"input": [[5], [-1]]}, "input"),
    ({"model": "minilm"}, "input"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "dimensions": 385}, "dimensions"),
    ({"input": "a", "dimensions": "many"}, "dimensions"),
    ({"input": "a", "truncate": "maybe"}, "truncate"),
])
def test_bad_input(server, minilm, body, param):
    r = requests.post(server.url + "/v1/embeddings", json={"model": "minilm", **body}, timeout=60)
    assert_error(r, 400, param)


def test_empty_string_message_names_the_item(server, minilm):
    err = assert_error(embed(server, input=["a", "b", ""]), 400, "input")
    assert "input[2]" in err["message"]


def test_too_many_inputs(server, minilm):
    err = assert_error(embed(server, input=["a"] * 2049), 400, "input")
    assert "2048" in err["message"] and "LLMHOST_MAX_EMBED_INPUTS" in err["message"]


def test_unknown_model_and_missing_model(server, minilm):
    assert_error(embed(server, model="nope", input="a"), 404, "model")
    r = requests.post(server.url + "/v1/embeddings", json={"input": "a"}, timeout=60)
    assert_error(r, 400, "model")


def test_concurrent_requests_stay_correct(server, minilm, reference):
    """Eight clients at once; half also send an over-long text with truncate, so
    truncating and plain requests share the tokenizer and the batches."""
    expected = dict(zip(SENTENCES + [LONG], reference.encode(SENTENCES + [LONG])))
    work = [(SENTENCES[i:] + SENTENCES[:i] + ([LONG] if i % 2 == 0 else []), i % 2 == 0)
            for i in range(8)]

    def run(item):
        texts, truncate = item
        return texts, ok(embed(server, input=texts, truncate=truncate))

    with ThreadPoolExecutor(8) as pool:
        for texts, body in pool.map(run, work):
            assert_close(vectors(body), np.array([expected[t] for t in texts]))


def test_model_object(server, minilm):
    body = requests.get(server.url + "/v1/models/minilm", timeout=60).json()
    validate(body, "Model")
    assert body["task"] == "embed" and body["dimensions"] == 384 and body["max_context"] == 256


def test_generation_routes_refuse_the_embedding_model(server, minilm):
    for path, extra in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                        ("/v1/completions", {"prompt": "hi"})):
        r = requests.post(server.url + path, json={"model": "minilm", **extra}, timeout=60)
        if r.status_code == 404 and "Unknown route" in r.text:
            pytest.skip(f"{path} is not registered yet")
        err = assert_error(r, 400, "model")
        assert "embeddings" in err["message"]


def test_embeddings_on_a_causal_lm_is_400(server, minilm, tiny_models):
    server.load(tiny_models["gpt2"], id="gpt2-not-an-embedder")
    try:
        err = assert_error(embed(server, model="gpt2-not-an-embedder", input="a"), 400, "model")
        assert err["code"] == "wrong_model_task" and "embeddings" in err["message"]
    finally:
        requests.delete(server.url + "/v1/models/gpt2-not-an-embedder", timeout=60)


def test_openapi_documents_the_route(server):
    spec = requests.get(server.url + "/openapi.json", timeout=60).json()
    post = spec["paths"]["/v1/embeddings"]["post"]
    assert post["summary"] == "Create embeddings"
    assert {"200", "400", "404", "429", "503"} <= set(post["responses"])


# -- the scheduler in-process: batching, the queue, errors, close ----------------

@pytest.fixture(scope="module")
def loaded(minilm_dir):
    from llmhost.config import TestConfig
    from llmhost.models.loading import LoadSpec, load
    return load(LoadSpec(model=minilm_dir), TestConfig())


def gated(loaded, **settings):
    """An EmbedScheduler whose forward passes wait for `gate`, recording how many
    requests shared each one (the real model runs; only the timing is held)."""
    from llmhost.config import TestConfig
    from llmhost.engine.embed import EmbedScheduler

    class Gated(EmbedScheduler):
        def __init__(self, *args):
            self.gate = threading.Event()
            self.batches: list[int] = []
            super().__init__(*args)

        def _step(self, batch):
            self.gate.wait()
            self.batches.append(len({id(job) for job, _ in batch}))
            super()._step(batch)

    return Gated("minilm", loaded, TestConfig(**settings)).start()


def run_in_thread(fn, *args, **kwargs):
    out = {}

    def target():
        try:
            out["result"] = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def test_concurrent_requests_share_a_forward_pass(loaded, reference):
    sched = gated(loaded, EMBED_BATCH=32)
    try:
        first, _ = run_in_thread(sched.embed, ["first"])
        wait_for(lambda: sched.stats() == {"queued": 0, "running": 1})
        calls = [run_in_thread(sched.embed, [text]) for text in SENTENCES]
        wait_for(lambda: sched.stats()["queued"] == len(SENTENCES))
        sched.gate.set()
        for thread, out in calls:
            thread.join(60)
        first.join(60)
        assert sched.batches == [1, len(SENTENCES)]  # all eight in one forward pass
        got = np.vstack([out["result"].vectors for _, out in calls])
        assert_close(got, reference.encode(SENTENCES))
    finally:
        sched.gate.set()
        sched.close("test over")


def test_a_small_request_gets_a_share_of_a_large_one(loaded):
    sched = gated(loaded, EMBED_BATCH=4)
    try:
        big, big_out = run_in_thread(sched.embed, [f"sentence {i}" for i in range(12)])
        wait_for(lambda: sched.stats()["running"] == 1)
        small, small_out = run_in_thread(sched.embed, ["small"])
        wait_for(lambda: sched.stats()["queued"] == 1)
        sched.gate.set()
        big.join(60), small.join(60)
        assert sched.batches[:2] == [1, 2]  # the small one rode along in the second pass
        assert len(sched.batches) == 4 and big_out["result"].vectors.shape == (12, 384)
    finally:
        sched.gate.set()
        sched.close("test over")


def test_queue_full_is_429_with_retry_after(loaded):
    from llmhost.engine.errors import QueueFull

    sched = gated(loaded, MAX_QUEUE=1)
    try:
        running, _ = run_in_thread(sched.embed, ["a"])
        wait_for(lambda: sched.stats()["running"] == 1)
        queued, queued_out = run_in_thread(sched.embed, ["b"])
        wait_for(lambda: sched.stats()["queued"] == 1)
        with pytest.raises(QueueFull) as info:
            sched.embed(["c"])
        err = from_engine(info.value)
        assert err.status == 429 and err.headers.get("Retry-After")
        assert "LLMHOST_MAX_QUEUE" in err.message
        sched.gate.set()
        queued.join(60)
        assert queued_out["result"].vectors.shape == (1, 384)
    finally:
        sched.gate.set()
        sched.close("test over")


def test_waiting_past_the_queue_timeout_is_503(loaded):
    sched = gated(loaded, QUEUE_TIMEOUT=0.5)
    try:
        running, running_out = run_in_thread(sched.embed, ["a"])
        wait_for(lambda: sched.stats()["running"] == 1)
        started = time.monotonic()
        queued, queued_out = run_in_thread(sched.embed, ["b"])
        queued.join(30)
        assert 0.4 < time.monotonic() - started < 10
        err = from_engine(queued_out["error"])
        assert err.status == 503 and err.code == "queue_timeout" and "LLMHOST_QUEUE_TIMEOUT" in err.message
        assert sched.stats()["queued"] == 0
        sched.gate.set()
        running.join(30)  # a running request is not timed out
        assert running_out["result"].vectors.shape == (1, 384)
    finally:
        sched.gate.set()
        sched.close("test over")


def test_close_fails_running_and_waiting_requests(loaded):
    sched = gated(loaded, EMBED_BATCH=2)
    running, running_out = run_in_thread(sched.embed, ["a", "b", "c", "d", "e"])  # three passes
    wait_for(lambda: sched.stats()["running"] == 1)
    queued, queued_out = run_in_thread(sched.embed, ["f"])
    wait_for(lambda: sched.stats()["queued"] == 1)
    closer, _ = run_in_thread(sched.close, "The model 'minilm' was unloaded.")
    wait_for(lambda: sched._closing is not None)
    sched.gate.set()
    for thread in (closer, running, queued):
        thread.join(60)
    for out in (running_out, queued_out):
        err = from_engine(out["error"])
        assert err.status == 503 and "unloaded" in err.message
    assert not sched._thread.is_alive()
    with pytest.raises(Exception) as info:
        sched.embed(["g"])
    assert from_engine(info.value).status == 503


def test_a_failing_forward_pass_answers_the_waiting_request(loaded):
    from llmhost.config import TestConfig
    from llmhost.engine.embed import EmbedScheduler
    from llmhost.engine.errors import EngineFailure

    class Broken(EmbedScheduler):
        def _forward(self, seqs):
            raise RuntimeError("boom")

    sched = Broken("minilm", loaded, TestConfig()).start()
    try:
        with pytest.raises(EngineFailure) as info:
            sched.embed(["a"])
        err = from_engine(info.value)
        assert err.status == 500 and "boom" not in err.message
        assert sched.stats() == {"queued": 0, "running": 0}
    finally:
        sched.close("test over")


def test_bench_embed_runs(server, minilm, minilm_dir, capsys):
    from llmhost.dev.bench import main

    assert main(["embed", "--url", server.url, "--model", minilm, "--inputs", "4", "--words", "5",
                 "--repeat", "1", "--compare-inprocess", minilm_dir]) == 0
    out = capsys.readouterr().out
    assert "4 inputs of 5 words" in out and "ratio (llmhost / in-process, medians)" in out
