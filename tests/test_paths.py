"""Paths and secrets (issue 9, section 6): every file opened for a load stays
inside LLMHOST_MODEL_DIRS (checked before opening), and server paths reach
only admin keys; plain keys and anonymous probes see ids and `<path:hash>`."""
import os

import pytest
import requests

from support import Server, assert_error

ADMIN = {"Authorization": "Bearer admin-key"}
USER = {"Authorization": "Bearer user-key"}


@pytest.fixture(scope="module")
def guarded(tiny_models, tmp_path_factory, smollm2_gguf):
    root = tiny_models["root"]
    escape = os.path.join(root, "escape")
    os.makedirs(escape, exist_ok=True)
    link = os.path.join(escape, "x.gguf")
    if not os.path.lexists(link):
        os.symlink(smollm2_gguf, link)     # inside the allowed folder, pointing outside
    srv = Server(env={"LLMHOST_API_KEYS": "user-key", "LLMHOST_ADMIN_API_KEYS": "admin-key",
                      "LLMHOST_MODEL_DIRS": root,
                      "LLMHOST_MODELS": os.path.join(root, "missing-model")}).start()
    r = requests.post(srv.url + "/v1/models", headers=ADMIN, timeout=120,
                      json={"model": tiny_models["llama"], "id": "p-llama"})
    assert r.status_code == 201, r.text
    r = requests.post(srv.url + "/v1/models", headers=ADMIN, timeout=120,
                      json={"model": tiny_models["gpt2"]})          # its id is its path
    assert r.status_code == 201, r.text
    srv.root = root
    srv.escape = escape
    yield srv
    srv.stop()


def test_gguf_file_stays_inside_model_dirs(guarded):
    for body, status, param in (
            ({"model": guarded.escape, "gguf_file": "x.gguf"}, 403, "model"),
            ({"model": guarded.escape, "gguf_file": "/etc/shadow"}, 400, "gguf_file"),
            ({"model": guarded.escape, "gguf_file": "../../../../etc/passwd"}, 400, "gguf_file")):
        r = requests.post(guarded.url + "/v1/models", headers=ADMIN, json=body, timeout=120)
        error = assert_error(r, status)
        assert "magic" not in error["message"]


def test_paths_only_for_admins(guarded, tiny_models):
    root = guarded.root
    ready = requests.get(guarded.url + "/ready", timeout=10)
    assert ready.json()["failed"], ready.json()
    assert root not in ready.text
    assert root in requests.get(guarded.url + "/ready", headers=ADMIN, timeout=10).text

    models = requests.get(guarded.url + "/v1/models", headers=USER, timeout=10)
    by_id = {m["id"]: m for m in models.json()["data"]}
    assert by_id["p-llama"]["source"].startswith("<path:")
    assert root not in by_id["p-llama"]["source"]
    admin_models = requests.get(guarded.url + "/v1/models", headers=ADMIN, timeout=10).json()
    assert any(m.get("source") == tiny_models["llama"] for m in admin_models["data"])
    # the model files under LLMHOST_MODEL_DIRS (their ids are paths) are listed to admins only
    on_disk = (root, os.path.realpath(root))
    for headers, listed in ((USER, False), (ADMIN, True)):
        cached = requests.get(guarded.url + "/v1/models?include=cached", headers=headers, timeout=30)
        assert cached.status_code == 200, cached.text
        files = [m for m in cached.json()["data"]
                 if m["status"] == "cached" and m["id"].startswith(on_disk)]
        assert bool(files) is listed, cached.text

    requests.post(guarded.url + "/v1/completions", headers=USER, timeout=60,
                  json={"model": tiny_models["gpt2"], "prompt": "hi", "max_tokens": 2})
    metrics = requests.get(guarded.url + "/metrics", timeout=10).text
    assert "llmhost_prompt_tokens" in metrics and root not in metrics
    assert root in requests.get(guarded.url + "/metrics", headers=ADMIN, timeout=10).text

    # a plain key's error messages name no server path either
    r = requests.post(guarded.url + "/v1/embeddings", headers=USER, timeout=10,
                      json={"model": tiny_models["gpt2"], "input": "x"})
    assert root not in r.text


def test_redaction_is_wired_by_create_app_and_hides_paths_by_default(make_app):
    """create_app hands redact its viewer and path sources; an app that wired
    none hides paths from every caller (the safe default), while code outside a
    request (logs, the CLI) still reads them."""
    from flask import Flask

    from llmhost.http import redact

    secret = os.path.join(os.sep, "srv", "models", "private")
    assert redact.may_see_paths() and redact.text(secret, force=False) == secret
    bare = Flask(__name__)
    with bare.test_request_context("/"):
        assert not redact.may_see_paths()
        assert redact.model_id(secret) == redact.label(secret)
    keyless = make_app()
    with keyless.test_request_context("/"):
        assert redact.may_see_paths()           # a keyless server: everyone is the operator
    keyed = make_app(API_KEYS=["k"], ADMIN_API_KEYS=["a"])
    with keyed.test_request_context("/", headers={"Authorization": "Bearer k"}):
        assert not redact.may_see_paths()
    with keyed.test_request_context("/", headers={"Authorization": "Bearer a"}):
        assert redact.may_see_paths()
