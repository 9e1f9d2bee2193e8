"""Model lifecycle: load, list, retrieve, unload; every bad input is an envelope."""
import os
import time

import pytest
import requests

from support import assert_error, validate
from llmhost.models.quantize import auto_cpu_dtype


# -- in-process (Flask test client) -------------------------------------------

def test_openapi_and_docs(client):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    assert "/v1/models" in spec["paths"] and "/v1/models/{model_id}" in spec["paths"]
    post = spec["paths"]["/v1/models"]["post"]
    assert post["summary"] == "Load a model"
    assert {"200", "201", "400", "404", "409"} <= set(post["responses"])
    assert client.get("/docs").status_code == 200
    assert b"redoc" in client.get("/redoc").data.lower()


@pytest.mark.parametrize("path", ["/", "/docs", "/redoc"])
def test_pages_keep_the_browser_on_this_server(client, path):
    """A Content-Security-Policy on every page llmhost serves: everything from
    'self' (ReDoc's CDN footer logo is not fetched), images and fonts also
    from data:, no host named anywhere; Swagger UI's inline script by hash."""
    import base64
    import hashlib
    import re

    response = client.get(path)
    assert response.status_code == 200 and response.mimetype == "text/html"
    policy = dict((d.split(" ", 1) + [""])[:2] for d in
                  response.headers["Content-Security-Policy"].split("; "))
    assert policy["default-src"] == "'self'" and policy["img-src"] == "'self' data:"
    assert policy["object-src"] == "'none'"
    sources = " ".join(policy.values()).split()
    assert all(s.startswith("'") or s in ("data:", "blob:") for s in sources), sources
    inline = re.findall(rb"<script>(.*?)</script>", response.get_data(), re.DOTALL)
    assert policy["script-src"].split() == ["'self'"] + [
        "'sha256-" + base64.b64encode(hashlib.sha256(s).digest()).decode() + "'" for s in inline]
    assert (path == "/docs") == bool(inline)    # Swagger UI's config script
    assert client.get("/openapi.json").headers.get("Content-Security-Policy") is None


@pytest.mark.parametrize("body, param", [
    ({}, "model"),
    ({"model": 3}, "model"),
    ({"model": "x", "device": "tpu"}, "device"),
    ({"model": "x", "device": "cuda"}, "device"),
    ({"model": "x", "dtype": "int3"}, "dtype"),
    ({"model": "x", "trust_remote_code": True}, "trust_remote_code"),
])
def test_load_bad_input(client, body, param):
    r = client.post("/v1/models", json=body)
    assert 400 <= r.status_code < 500
    err = r.get_json()["error"]
    validate(r.get_json(), "ErrorResponse")
    assert err["param"] == param, err


def test_cuda_message_lists_devices(client):
    err = client.post("/v1/models", json={"model": "x", "device": "cuda:0"}).get_json()["error"]
    assert "available devices" in err["message"] and "cpu" in err["message"]


def test_remote_code_refused(client):
    r = client.post("/v1/models", json={"model": "x", "trust_remote_code": True})
    assert r.status_code == 403
    assert "LLMHOST_ALLOW_REMOTE_CODE" in r.get_json()["error"]["message"]


def test_missing_path_and_empty_folder(client, tmp_path):
    r = client.post("/v1/models", json={"model": str(tmp_path / "nope")})
    assert r.status_code == 404 and str(tmp_path / "nope") in r.get_json()["error"]["message"]
    r = client.post("/v1/models", json={"model": str(tmp_path)})
    assert r.status_code == 400 and str(tmp_path) in r.get_json()["error"]["message"]


def test_uncached_hub_id_offline_fails_fast(client):
    started = time.monotonic()
    r = client.post("/v1/models", json={"model": "someorg/not-cached-model"})
    assert time.monotonic() - started < 10
    assert r.status_code == 404
    msg = r.get_json()["error"]["message"]
    assert "not in the local Hugging Face cache" in msg and "offline" in msg


def test_malformed_json_and_content_type(client):
    r = client.post("/v1/models", data="{bad", content_type="application/json")
    assert r.status_code == 400 and "JSON" in r.get_json()["error"]["message"]
    r = client.post("/v1/models", data="model=x", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415 and "application/json" in r.get_json()["error"]["message"]


def test_unknown_route_and_method(client):
    for r, status in ((client.get("/v1/nothing"), 404), (client.put("/v1/models"), 405)):
        assert r.status_code == status
        validate(r.get_json(), "ErrorResponse")


def test_not_loaded(client):
    for r in (client.get("/v1/models/org/none"), client.delete("/v1/models/org/none")):
        assert r.status_code == 404
        assert "org/none" in r.get_json()["error"]["message"]


def test_unknown_fields_are_ignored(client):
    r = client.post("/v1/models", json={"model": "/does/not/exist", "something_new": 1})
    assert r.status_code == 404  # reached loading: the unknown field was no 400


# -- end to end (gunicorn + requests + openai) --------------------------------

def test_lifecycle_local_folder(server, openai_client, tiny_models):
    path = tiny_models["gpt2"]
    r = requests.post(server.url + "/v1/models", json={"model": path})
    assert r.status_code == 201, r.text
    body = validate(r.json(), "Model")
    assert body["id"] == path and body["status"] == "loaded" and body["device"] == "cpu"
    auto = str(auto_cpu_dtype()).removeprefix("torch.")  # bfloat16 where the CPU has native bf16
    assert body["dtype"] == auto and body["parameters"] > 0 and body["memory_bytes"] > 0
    assert body["quantization"] is None
    assert requests.post(server.url + "/v1/models", json={"model": path}).status_code == 200
    r = requests.post(server.url + "/v1/models", json={"model": path, "dtype": "float16"})
    assert_error(r, 409, "model")
    ids = [m.id for m in openai_client.models.list().data]
    assert path in ids
    validate(requests.get(server.url + "/v1/models").json(), "ListModelsResponse")
    assert openai_client.models.retrieve(path).id == path
    r = requests.delete(server.url + "/v1/models" + path)
    assert r.status_code == 200 and r.json() == {"id": path, "object": "model", "deleted": True}, r.text
    validate(r.json(), "DeleteModelResponse")
    assert path not in [m.id for m in openai_client.models.list().data]


def test_lifecycle_cached_hub_id(server, openai_client, tiny_models):
    repo = tiny_models["cached"]
    listed = requests.get(server.url + "/v1/models", params={"include": "cached"}).json()
    validate(listed, "ListModelsResponse")
    assert any(m["id"] == repo and m["status"] == "cached" for m in listed["data"])
    started = time.monotonic()
    body = server.load(repo)
    assert time.monotonic() - started < 60
    assert body["id"] == repo and body["revision"] == "0" * 40
    assert openai_client.models.retrieve(repo).id == repo
    assert requests.delete(f"{server.url}/v1/models/{repo}").json()["deleted"] is True
    assert_error(requests.get(f"{server.url}/v1/models/{repo}"), 404, "model")


def test_concurrent_loads_load_once(server, tiny_models):
    from concurrent.futures import ThreadPoolExecutor

    path = tiny_models["llama"]
    with ThreadPoolExecutor(4) as pool:
        codes = sorted(pool.map(lambda _: requests.post(server.url + "/v1/models", json={
            "model": path, "id": "concurrent"}).status_code, range(4)))
    assert codes == [200, 200, 200, 201]
    assert requests.delete(server.url + "/v1/models/concurrent").status_code == 200


def test_smollm2_gguf_load_and_unload_frees_memory(server, smollm2_gguf):
    before = server.worker_rss()
    body = server.load(smollm2_gguf, id="smollm2-lifecycle")
    validate(body, "Model")
    assert body["gguf_file"] == os.path.basename(smollm2_gguf)
    assert body["parameters"] > 100_000_000
    loaded = server.worker_rss()
    r = requests.delete(server.url + "/v1/models/smollm2-lifecycle")
    assert r.status_code == 200
    after = server.worker_rss()
    took, gave_back = loaded - before, loaded - after
    print(f"SmolLM2 load took {took / 2**20:.0f} MiB of RSS, unload gave back "
          f"{gave_back / 2**20:.0f} MiB ({100 * gave_back / took:.0f}%)")
    assert gave_back >= 0.8 * took
