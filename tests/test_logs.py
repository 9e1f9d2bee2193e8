"""Request log lines: request ids, JSON and text formats, keys never logged,
prompt and completion text only with LLMHOST_LOG_CONTENT=1."""
from __future__ import annotations

import logging
import re

import requests

from support import (ADMIN_KEY, ENV_KEY, FILE_KEY, WRONG_KEY, assert_error, auth,
                     json_log_lines, load_local, wait_for)


def test_request_id_and_jsonjson_log_lines(secure):
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
        found = [x for x in json_log_lines(secure) if x.get("request_id") == request_id]
        return found[0] if found else None

    entry = wait_for(lambda: line(rid), timeout=10)
    assert entry["method"] == "GET" and entry["path"] == "/v1/models" and entry["status"] == 200
    assert entry["latency_ms"] >= 0 and entry["logger"] == "llmhost.request" and entry["level"] == "INFO"
    assert wait_for(lambda: line("err-1"), timeout=10)["status"] == 404
    assert any("Booting worker" in x.get("message", "") for x in json_log_lines(secure))  # gunicorn's own
    assert not any("forged" in x for x in secure.log().splitlines())


def test_keys_never_reach_the_log(secure):
    """Every key is sent here, right and wrong (and by other tests of this server)."""
    for key in (ENV_KEY, FILE_KEY, ADMIN_KEY, WRONG_KEY):
        requests.get(secure.url + "/v1/models", headers=auth(key))
        requests.delete(secure.url + "/v1/models/not-loaded", headers=auth(key))
    wait_for(lambda: "not-loaded" in secure.log(), timeout=10)
    log = secure.log()
    assert "request_id" in log
    for key in (ENV_KEY, FILE_KEY, ADMIN_KEY, WRONG_KEY):
        assert key not in log


def test_text_request_log_line(policy, metered):
    requests.get(policy.url + "/v1/models/metered", headers={"X-Request-Id": "text-line-1"})
    line = wait_for(lambda: next((x for x in policy.log().splitlines() if "request_id=text-line-1" in x),
                                 None), timeout=10)
    assert "method=GET path=/v1/models/metered status=200 model=metered" in line
    assert re.search(r"latency_ms=[\d.]+", line)


def test_log_content_only_when_enabled(make_app, tiny_models, caplog):
    """Prompt and completion text reach the request line with LLMHOST_LOG_CONTENT=1
    only, streamed or not."""
    clients = {enabled: make_app(LOG_CONTENT=enabled).test_client() for enabled in (False, True)}
    load_local(tiny_models["gpt2"], "content-log")  # the registry is the process's: both apps serve it
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
