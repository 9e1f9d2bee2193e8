"""What a router needs from one replica (issue 18), through the Flask test
client: a model the preload is about to load answers 503 + Retry-After (never
404) on requests, on /ready?model=ID and on GET /v1/models/{id}; the
unlabelled waiting / running gauges; the journal named by the server id."""
from __future__ import annotations

import os

from llmhost.models.registry import registry


def test_a_model_still_coming_is_503_with_retry_after(client):
    registry.expect(["coming-soon"])
    try:
        for r in (client.post("/v1/chat/completions", json={
                      "model": "coming-soon", "messages": [{"role": "user", "content": "hi"}]}),
                  client.get("/v1/models/coming-soon")):
            assert r.status_code == 503, r.get_json()
            assert r.headers["Retry-After"] and r.get_json()["error"]["code"] == "model_loading"
        ready = client.get("/ready?model=coming-soon")
        assert ready.status_code == 503 and ready.headers["Retry-After"]
        assert ready.get_json()["status"] == "loading"
    finally:
        registry.expect(["coming-soon"], coming=False)
    assert client.get("/v1/models/coming-soon").status_code == 404
    absent = client.get("/ready?model=coming-soon")
    assert absent.status_code == 404 and absent.get_json()["status"] == "absent"
    assert client.get("/ready").status_code == 200          # the server as a whole is ready


def test_ready_for_a_loaded_model(make_app, tiny_models):
    from support import load_local

    app = make_app()
    load_local(tiny_models["llama"], "router-ready")
    client = app.test_client()
    assert client.get("/ready?model=router-ready").status_code == 200
    assert client.get("/v1/models/router-ready").get_json()["id"] == "router-ready"
    lines = client.get("/metrics").get_data(as_text=True).splitlines()
    for gauge in ("llmhost_requests_waiting", "llmhost_requests_running"):
        assert any(line.startswith(gauge + " ") for line in lines), gauge


def test_journal_is_named_by_the_server_id(tmp_path):
    from llmhost.config import Config
    from llmhost.models import journal

    names = set()
    try:
        for server in ("pod-a", "pod-b", "host@http://127.0.0.1:8001"):
            config = Config({"LLMHOST_STATE_DIR": str(tmp_path), "LLMHOST_SERVER_ID": server})
            journal.init(config)
            journal.record({"model": "/m"}, f"model-of-{server}")
            names.add(os.path.basename(journal._path))
    finally:
        journal._path = None                   # this process is no server
    assert len(names) == 3 and len(os.listdir(tmp_path)) == 3, names
