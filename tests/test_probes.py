"""/health, /ready (503 until LLMHOST_MODELS was tried), /metrics open while
docs need a key, and LLMHOST_MODELS parsing and preloading."""
from __future__ import annotations

import json
import os

import pytest
import requests

from support import ADMIN_KEY, ENV_KEY, assert_error, auth, wait_for


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


def test_models_setting_parses(tiny_models):
    from llmhost.server.preload import parse

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
