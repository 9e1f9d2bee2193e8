"""Operations and security: keys and admin scope, CORS, probes, metrics, preload,
memory policy, where models may come from, body limit, request logs.

Two gunicorn servers: `secure` (keys, admin keys, closed docs, CORS, JSON logs,
LLMHOST_MODEL_DIRS, downloads off, a preload held back by a named pipe) and
`policy` (LLMHOST_MAX_LOADED_MODELS=1, text logs). What needs a request held
open inside the registry is tested in-process with the real registry.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from support import Server, assert_error

ENV_KEY = "sk-env-4f1c0a9e7b2d"
FILE_KEY = "sk-file-9d3e77c1a0b4"
ADMIN_KEY = "sk-admin-1b8f2c6d5e3a"
WRONG_KEY = "sk-wrong-77aa31cc09ef"
ORIGIN = "https://app.example"


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s")


def scrape(server: Server) -> dict:
    """{(sample name, frozenset(labels)): value} from /metrics."""
    r = requests.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def sample(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


# -- the secure server ----------------------------------------------------------

@pytest.fixture(scope="module")
def gate(tiny_models):
    """A copy of the tiny GPT-2 under the model root whose config.json is a named
    pipe: preloading it blocks on reading that file until the test releases it,
    so /ready is 503 for as long as the test wants, not for a lucky second."""
    folder = os.path.join(tiny_models["root"], "gated-gpt2")
    shutil.copytree(tiny_models["gpt2"], folder)
    config = os.path.join(folder, "config.json")
    with open(config) as fh:
        content = fh.read()
    os.remove(config)
    os.mkfifo(config)
    return {"folder": folder, "config": config, "content": content}


@pytest.fixture(scope="module")
def secure(tiny_models, gate, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# team keys, one per line\n\n{FILE_KEY}\n")
    missing = os.path.join(tiny_models["root"], "no-such-model")
    srv = Server(env={
        "LLMHOST_API_KEYS": ENV_KEY, "LLMHOST_API_KEYS_FILE": str(keys),
        "LLMHOST_ADMIN_API_KEYS": ADMIN_KEY, "LLMHOST_PUBLIC_DOCS": "0",
        "LLMHOST_CORS_ORIGINS": ORIGIN, "LLMHOST_LOG_FORMAT": "json", "LLMHOST_LOG_LEVEL": "debug",
        "LLMHOST_MODEL_DIRS": tiny_models["root"], "LLMHOST_ALLOW_DOWNLOADS": "0",
        "LLMHOST_MODELS": f"{gate['folder']}@cpu,{missing}",
    }).start()
    srv.missing = missing
    yield srv
    srv.stop()


def _release(gate: dict) -> None:
    """Open the pipe once the preload reads it, swap in the real file for every
    later read, then hand the blocked reader the real content."""
    fd = wait_for(lambda: _open_writer(gate["config"]), timeout=60)
    tmp = gate["config"] + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(gate["content"])
    os.replace(tmp, gate["config"])
    with os.fdopen(fd, "w") as pipe:
        pipe.write(gate["content"])


def _open_writer(path: str):
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: nobody reads the pipe yet
        return None


def test_ready_is_503_until_preload_is_done(secure, gate):
    assert requests.get(secure.url + "/health").json() == {"status": "ok"}
    # server paths in /ready are for admin keys on a server with keys (tests/test_paths.py)
    r = requests.get(secure.url + "/ready", headers=auth(ADMIN_KEY))
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["status"] == "loading" and "gated-gpt2" not in body["loaded"]
    assert gate["folder"] in body["loading"]

    _release(gate)
    r = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
        requests.get(secure.url + "/ready", headers=auth(ADMIN_KEY))), timeout=60)
    body = r.json()
    assert body["status"] == "ready" and body["loading"] == []
    assert body["loaded"] == [gate["folder"]]
    assert [f["model"] for f in body["failed"]] == [secure.missing]
    assert "No file or folder" in body["failed"][0]["error"]
    assert "FAILED" in secure.log() and secure.missing in secure.log()
    models = requests.get(secure.url + "/v1/models", headers=auth(ENV_KEY)).json()["data"]
    assert [m["id"] for m in models] == [gate["folder"]] and models[0]["device"] == "cpu"


def test_v1_needs_a_key(secure):
    for headers in ({}, auth(WRONG_KEY), {"Authorization": f"Basic {ENV_KEY}"}, auth("")):
        r = requests.get(secure.url + "/v1/models", headers=headers)
        err = assert_error(r, 401, None)
        assert err["type"] == "authentication_error"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert WRONG_KEY not in r.text
    r = requests.post(secure.url + "/v1/chat/completions", json={"model": "x", "messages": []})
    assert_error(r, 401)
    for key in (ENV_KEY, FILE_KEY, ADMIN_KEY):
        assert requests.get(secure.url + "/v1/models", headers=auth(key)).status_code == 200, key
    assert requests.get(secure.url + "/v1/models", headers=auth("# team keys, one per line")).status_code == 401


def test_plain_keys_cannot_load_or_unload(secure, tiny_models):
    path = tiny_models["llama"]
    for key in (ENV_KEY, FILE_KEY):
        err = assert_error(requests.post(secure.url + "/v1/models", json={"model": path},
                                         headers=auth(key)), 403)
        assert err["type"] == "permission_error" and "admin" in err["message"]
    r = requests.post(secure.url + "/v1/models", json={"model": path, "id": "llama-admin"},
                      headers=auth(ADMIN_KEY))
    assert r.status_code == 201, r.text
    assert_error(requests.delete(secure.url + "/v1/models/llama-admin", headers=auth(ENV_KEY)), 403)
    assert requests.get(secure.url + "/v1/models/llama-admin", headers=auth(ENV_KEY)).status_code == 200
    r = requests.delete(secure.url + "/v1/models/llama-admin", headers=auth(ADMIN_KEY))
    assert r.status_code == 200 and r.json()["deleted"] is True


def test_probes_and_metrics_open_docs_closed(secure):
    for path in ("/health", "/metrics"):
        assert requests.get(secure.url + path).status_code == 200, path
    assert requests.get(secure.url + "/ready").status_code in (200, 503)
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert_error(requests.get(secure.url + path), 401)
        assert requests.get(secure.url + path, headers=auth(ENV_KEY)).status_code == 200, path
    spec = requests.get(secure.url + "/openapi.json", headers=auth(ENV_KEY)).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["paths"]["/ready"]["get"]["security"] == []


def test_cors(secure):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = requests.options(secure.url + "/v1/models", headers={"Origin": ORIGIN, **preflight})
    assert r.status_code == 200, r.text
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert "POST" in r.headers["Access-Control-Allow-Methods"]

    r = requests.get(secure.url + "/v1/models", headers={"Origin": ORIGIN, **auth(ENV_KEY)})
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-Request-Id" in r.headers["Access-Control-Expose-Headers"]
    r = requests.get(secure.url + "/v1/models", headers={"Origin": ORIGIN})  # browsers read the 401
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == ORIGIN

    evil = "https://evil.example"
    r = requests.options(secure.url + "/v1/models", headers={"Origin": evil, **preflight})
    assert "Access-Control-Allow-Origin" not in r.headers
    r = requests.get(secure.url + "/v1/models", headers={"Origin": evil, **auth(ENV_KEY)})
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers


def test_model_dirs_refuse_paths_outside(secure, tiny_models, tmp_path_factory):
    root = tiny_models["root"]
    outside = str(tmp_path_factory.mktemp("outside") / "gpt2")
    shutil.copytree(tiny_models["gpt2"], outside)
    sibling = root + "-evil"  # shares the root's name as a prefix
    shutil.copytree(tiny_models["gpt2"], sibling)
    escape = os.path.join(root, "escape")
    os.symlink(outside, escape)
    inside = os.path.join(root, "inside-link")
    os.symlink(tiny_models["gpt2"], inside)

    dotdot = os.path.join(root, "..", os.path.relpath(outside, os.path.dirname(root)))
    for path in (dotdot, escape, sibling, outside):
        r = requests.post(secure.url + "/v1/models", json={"model": path}, headers=auth(ADMIN_KEY))
        err = assert_error(r, 403, "model")
        assert err["code"] == "path_not_allowed" and "LLMHOST_MODEL_DIRS" in err["message"], path

    r = requests.post(secure.url + "/v1/models", json={"model": inside, "id": "inside"},
                      headers=auth(ADMIN_KEY))
    assert r.status_code == 201, r.text  # a link that stays inside the root is fine
    assert requests.delete(secure.url + "/v1/models/inside", headers=auth(ADMIN_KEY)).status_code == 200


def test_downloads_disabled(secure, tiny_models):
    r = requests.post(secure.url + "/v1/models", json={"model": "someorg/never-downloaded"},
                      headers=auth(ADMIN_KEY))
    err = assert_error(r, 403, "model")
    assert err["code"] == "downloads_disabled" and "LLMHOST_ALLOW_DOWNLOADS=0" in err["message"]
    r = requests.post(secure.url + "/v1/models", json={"model": tiny_models["cached"]},
                      headers=auth(ADMIN_KEY))
    assert r.status_code == 201, r.text  # what is already cached still loads
    r = requests.delete(f"{secure.url}/v1/models/{tiny_models['cached']}", headers=auth(ADMIN_KEY))
    assert r.status_code == 200


def test_body_over_limit_is_a_clean_413(secure):
    body = b'{"model": "' + b"x" * (40 * 2**20) + b'"}'
    started = time.monotonic()
    r = requests.post(secure.url + "/v1/models", data=body, timeout=60,
                      headers={"Content-Type": "application/json", **auth(ADMIN_KEY)})
    err = assert_error(r, 413, None)
    assert "LLMHOST_MAX_BODY_BYTES" in err["message"] and r.headers["X-Request-Id"]
    assert time.monotonic() - started < 30
    for _ in range(3):  # the server keeps serving, on new connections and reused ones
        assert requests.get(secure.url + "/v1/models", headers=auth(ENV_KEY)).status_code == 200
    # The body is read and dropped, so the connection stays usable: without that,
    # gunicorn gives up draining after 64 KiB and closes it under the client.
    conn = http.client.HTTPConnection("127.0.0.1", secure.port, timeout=60)
    conn.request("POST", "/v1/models", body=body, headers={
        "Content-Type": "application/json", **auth(ADMIN_KEY)})
    first = conn.getresponse()
    assert first.status == 413 and json.loads(first.read())["error"]["code"] == "request_too_large"
    sock = conn.sock
    conn.request("GET", "/v1/models", headers=auth(ENV_KEY))
    second = conn.getresponse()
    assert second.status == 200 and conn.sock is sock
    conn.close()


def _log_lines(server: Server) -> list[dict]:
    lines = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_request_id_and_json_log_lines(secure):
    rid = "trace-4711.abc"
    r = requests.get(secure.url + "/v1/models", headers={"X-Request-Id": rid, **auth(ENV_KEY)})
    assert r.headers["X-Request-Id"] == rid
    generated = requests.get(secure.url + "/v1/models", headers=auth(ENV_KEY)).headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    r = requests.get(secure.url + "/v1/models", headers={"X-Request-Id": "bad id forged=1"})
    assert r.status_code == 401 and re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-Id"])
    r = requests.get(secure.url + "/v1/nothing", headers={"X-Request-Id": "err-1", **auth(ENV_KEY)})
    assert_error(r, 404)
    assert r.headers["X-Request-Id"] == "err-1"

    def line(request_id):
        found = [x for x in _log_lines(secure) if x.get("request_id") == request_id]
        return found[0] if found else None

    entry = wait_for(lambda: line(rid), timeout=10)
    assert entry["method"] == "GET" and entry["path"] == "/v1/models" and entry["status"] == 200
    assert entry["latency_ms"] >= 0 and entry["logger"] == "llmhost.request" and entry["level"] == "INFO"
    assert wait_for(lambda: line("err-1"), timeout=10)["status"] == 404
    assert any("Booting worker" in x.get("message", "") for x in _log_lines(secure))  # gunicorn's own
    assert not any("forged" in x for x in secure.log().splitlines())


def test_keys_never_reach_the_log(secure):
    """Last in this module: every key above was sent, right and wrong."""
    requests.get(secure.url + "/v1/models", headers=auth(WRONG_KEY))
    log = secure.log()
    assert "request_id" in log
    for key in (ENV_KEY, FILE_KEY, ADMIN_KEY, WRONG_KEY):
        assert key not in log


# -- the policy server -------------------------------------------------------------

@pytest.fixture(scope="module")
def policy(tiny_models):
    srv = Server(env={"LLMHOST_MAX_LOADED_MODELS": "1"}).start()
    yield srv
    srv.stop()


def loaded_ids(server: Server) -> list[str]:
    return [m["id"] for m in requests.get(server.url + "/v1/models").json()["data"]]


def test_max_loaded_models_evicts(policy, tiny_models):
    policy.load(tiny_models["gpt2"], id="first")
    assert loaded_ids(policy) == ["first"]
    policy.load(tiny_models["llama"], id="second")
    assert loaded_ids(policy) == ["second"]
    assert "unloaded first (least recently used" in policy.log()
    assert sample(scrape(policy), "llmhost_loaded_models") == 1
    policy.load(tiny_models["gpt2"], id="first")
    assert loaded_ids(policy) == ["first"]


def test_keep_alive_unloads_idle_models(policy, tiny_models):
    body = policy.load(tiny_models["gpt2"], id="short-lived", keep_alive=1)
    assert body["keep_alive"] == 1.0
    assert "short-lived" in loaded_ids(policy)
    wait_for(lambda: "short-lived" not in loaded_ids(policy), timeout=15)
    wait_for(lambda: "unloaded short-lived (idle for keep_alive=1s)" in policy.log(), timeout=5)


def test_metrics_count_requests_and_loads(policy, tiny_models):
    labels = {"route": "/v1/models", "method": "GET", "status": "200"}
    before = scrape(policy)
    for _ in range(3):
        requests.get(policy.url + "/v1/models")
    after = wait_for(lambda: (lambda m: m if sample(m, "llmhost_requests_total", **labels)
                              >= sample(before, "llmhost_requests_total", **labels) + 3 else None)(
        scrape(policy)), timeout=10)
    assert sample(after, "llmhost_request_duration_seconds_count", route="/v1/models") >= 3
    policy.load(tiny_models["llama"], id="metered")
    metrics = scrape(policy)
    assert sample(metrics, "llmhost_model_load_seconds_count", model="metered") == 1
    assert sample(metrics, "llmhost_model_load_seconds_sum", model="metered") > 0
    assert sample(metrics, "llmhost_loaded_models") == len(loaded_ids(policy)) == 1
    assert sample(metrics, "llmhost_model_memory_bytes", model="metered") > 0
    assert sample(metrics, "llmhost_model_active_requests", model="metered") == 0
    r = requests.get(policy.url + "/v1/models/nope")
    assert r.status_code == 404
    missing = {"route": "/v1/models/<path:model_id>", "method": "GET", "status": "404"}
    wait_for(lambda: sample(scrape(policy), "llmhost_requests_total", **missing) >= 1, timeout=10)


def test_text_request_log_line(policy):
    requests.get(policy.url + "/v1/models/metered", headers={"X-Request-Id": "text-line-1"})
    line = wait_for(lambda: next((x for x in policy.log().splitlines() if "request_id=text-line-1" in x),
                                 None), timeout=10)
    assert "method=GET path=/v1/models/metered status=200 model=metered" in line
    assert re.search(r"latency_ms=[\d.]+", line)


# -- in-process: the real registry, held busy from the test --------------------------

@pytest.fixture()
def make_app():
    from llmhost import create_app
    from llmhost.config import TestConfig
    from llmhost.registry import registry

    before = {entry.id for entry in registry.list()}
    yield lambda **settings: create_app(TestConfig(**settings))
    for entry in registry.list():  # only what this test loaded
        if entry.id not in before:
            registry.unload(entry.id)


def _load(path: str, model_id: str, **options):
    from llmhost.loading import LoadSpec
    from llmhost.registry import registry
    return registry.load(LoadSpec(model=path, id=model_id, device="cpu", **options))[0]


def test_lru_skips_busy_models_and_refuses_when_all_are_busy(make_app, tiny_models):
    from llmhost.errors import APIError
    from llmhost.registry import registry

    make_app(MAX_LOADED_MODELS=2)
    _load(tiny_models["gpt2"], "old")
    _load(tiny_models["gpt2"], "newer")
    with registry.use("old"):  # least recently used, but busy
        _load(tiny_models["gpt2"], "third")
        assert sorted(e.id for e in registry.list()) == ["old", "third"]
        with registry.use("third"):
            with pytest.raises(APIError) as info:
                _load(tiny_models["gpt2"], "fourth")
            assert info.value.status == 503 and info.value.code == "model_limit_reached"
            assert "LLMHOST_MAX_LOADED_MODELS=2" in info.value.message
    assert registry.loading() == []
    _load(tiny_models["gpt2"], "fourth")  # both idle now; "third" was released first
    assert sorted(e.id for e in registry.list()) == ["fourth", "old"]


def test_keep_alive_spares_busy_models(make_app, tiny_models):
    from llmhost.registry import registry

    make_app()
    _load(tiny_models["gpt2"], "ttl", keep_alive=0.2)
    with registry.use("ttl"):
        time.sleep(0.4)
        assert registry.reap() == []
    assert registry.find("ttl") is not None  # the request just ended: idle again from now
    wait_for(lambda: registry.find("ttl") is None, timeout=5)  # the reaper thread


def test_autoload_follows_admin_rules(make_app, tiny_models):
    from llmhost.errors import APIError
    from llmhost.registry import registry

    repo = tiny_models["cached"]
    make_app()  # autoload off
    with pytest.raises(APIError) as info:
        with registry.use(repo):
            pass
    assert info.value.status == 404

    app = make_app(AUTOLOAD=True, API_KEYS=["plain"], ADMIN_API_KEYS=["admin"])
    with app.test_request_context("/v1/chat/completions", method="POST", headers=auth("plain")):
        app.preprocess_request()
        with pytest.raises(APIError) as info:
            with registry.use(repo):
                pass
        assert info.value.status == 404
    assert registry.find(repo) is None
    with app.test_request_context("/v1/chat/completions", method="POST", headers=auth("admin")):
        app.preprocess_request()
        with registry.use(repo) as entry:
            assert entry.id == repo and entry.active == 1
    with pytest.raises(APIError):  # a hub id that is not cached is never fetched
        with registry.use("someorg/not-cached"):
            pass


def test_models_setting_parses(tiny_models):
    from llmhost.preload import parse

    assert parse("") == []
    assert parse("gpt2@cpu, /models/x ,org/name@cuda:1,/a@b/c") == [
        {"model": "gpt2", "device": "cpu"}, {"model": "/models/x"},
        {"model": "org/name", "device": "cuda:1"}, {"model": "/a@b/c"}]
    assert parse('[{"model": "gpt2", "id": "g", "keep_alive": 60}, "x@mps"]') == [
        {"model": "gpt2", "id": "g", "keep_alive": 60}, {"model": "x", "device": "mps"}]
    assert parse('{"model": "gpt2"}') == [{"model": "gpt2"}]
    with pytest.raises(ValueError, match="LLMHOST_MODELS"):
        parse("[{oops")


def test_preload_in_process_reports_bad_entries(make_app, tiny_models):
    app = make_app(MODELS=json.dumps([{"model": tiny_models["gpt2"], "id": "pre", "device": "cpu"},
                                      {"model": "x", "dtype": "int3"}]))
    client = app.test_client()
    body = wait_for(lambda: (lambda r: r.get_json() if r.status_code == 200 else None)(
        client.get("/ready")), timeout=60)
    assert body["loaded"] == ["pre"]
    assert body["failed"] == [{"model": "x", "error": body["failed"][0]["error"]}]
    assert "dtype" in body["failed"][0]["error"]


def test_docs_public_by_default_and_key_file_required(make_app, tmp_path):
    client = make_app(API_KEYS=["k"]).test_client()
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.get("/v1/models").status_code == 401
    with pytest.raises(RuntimeError, match="LLMHOST_API_KEYS_FILE"):
        make_app(API_KEYS_FILE=str(tmp_path / "missing.txt"))


def test_token_and_ttft_metrics():
    from llmhost import metrics

    def read():
        body, _ = metrics.exposition()
        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(body.decode()) for s in f.samples}

    before = read()
    metrics.record_tokens("m-test", 7, 3)
    metrics.observe_ttft("m-test", 0.05)
    after = read()
    for name, delta in (("llmhost_prompt_tokens_total", 7), ("llmhost_completion_tokens_total", 3),
                        ("llmhost_time_to_first_token_seconds_count", 1)):
        assert sample(after, name, model="m-test") - sample(before, name, model="m-test") == delta


def test_generation_feeds_token_metrics_and_log_lines(policy):
    """The engine's token counts reach /metrics and the request line, a stream's
    at its end; the prompt text itself is not logged."""
    before = scrape(policy)
    secret = "zebra-quokka-prompt"
    r = requests.post(policy.url + "/v1/completions", headers={"X-Request-Id": "gen-plain"}, json={
        "model": "metered", "prompt": secret, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    with requests.post(policy.url + "/v1/completions", headers={"X-Request-Id": "gen-stream"}, json={
            "model": "metered", "prompt": secret, "max_tokens": 5, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}, stream=True) as r:
        events = [line for line in r.iter_lines() if line.startswith(b"data: {")]
    streamed = json.loads(events[-1][6:])["usage"]

    def line(rid):
        return next((x for x in policy.log().splitlines() if f"request_id={rid} " in x), None)

    plain, stream = wait_for(lambda: line("gen-plain")), wait_for(lambda: line("gen-stream"))
    assert (f"model=metered prompt_tokens={usage['prompt_tokens']} "
            f"completion_tokens={usage['completion_tokens']}") in plain
    assert f"completion_tokens={streamed['completion_tokens']}" in stream
    assert secret not in policy.log()

    def grew(metrics, name):
        return sample(metrics, name, model="metered") - sample(before, name, model="metered")

    # the engine records a generation's tokens right after handing over its last event
    after = wait_for(lambda: (lambda m: m if grew(m, "llmhost_prompt_tokens_total") >= (
        usage["prompt_tokens"] + streamed["prompt_tokens"]) else None)(scrape(policy)), timeout=10)
    for name, key in (("llmhost_prompt_tokens_total", "prompt_tokens"),
                      ("llmhost_completion_tokens_total", "completion_tokens")):
        assert grew(after, name) == usage[key] + streamed[key], name
    ttft = "llmhost_time_to_first_token_seconds_count"
    assert sample(after, ttft, model="metered") - sample(before, ttft, model="metered") == 2


def test_log_content_only_when_enabled(make_app, tiny_models, caplog):
    """Prompt and completion text reach the request line with LLMHOST_LOG_CONTENT=1
    only, streamed or not."""
    clients = {enabled: make_app(LOG_CONTENT=enabled).test_client() for enabled in (False, True)}
    _load(tiny_models["gpt2"], "content-log")
    secret = "walrus-in-the-prompt"
    for enabled, client in clients.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="llmhost.request"):
            plain = client.post("/v1/completions", json={
                "model": "content-log", "prompt": secret, "max_tokens": 3, "temperature": 0})
            stream = client.post("/v1/completions", json={
                "model": "content-log", "prompt": secret, "max_tokens": 3, "temperature": 0,
                "stream": True})
            assert plain.status_code == stream.status_code == 200
            for response in (plain, stream):
                response.get_data()
                response.close()  # the request line is written when the response closes
        lines = [r.fields for r in caplog.records if getattr(r, "fields", None)]
        assert len(lines) == 2
        completion = plain.get_json()["choices"][0]["text"]
        for fields in lines:
            assert (fields.get("prompt") == secret) is enabled
            assert (fields.get("completion") == [completion]) is enabled
