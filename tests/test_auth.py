"""API keys on /v1 (env, file, admin scope), closed or public docs, and
autoload following the admin rules."""
from __future__ import annotations

import pytest
import requests

from support import ADMIN_KEY, ENV_KEY, FILE_KEY, WRONG_KEY, assert_error, auth


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


def test_docs_public_by_default_and_key_file_required(make_app, tmp_path):
    client = make_app(API_KEYS=["k"]).test_client()
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.get("/v1/models").status_code == 401
    with pytest.raises(RuntimeError, match="LLMHOST_API_KEYS_FILE"):
        make_app(API_KEYS_FILE=str(tmp_path / "missing.txt"))


def test_autoload_follows_admin_rules(make_app, tiny_models):
    from llmhost.api.access import use_model
    from llmhost.engine.errors import Refused
    from llmhost.http.errors import as_api_error
    from llmhost.models.registry import registry

    repo = tiny_models["cached"]
    off = make_app()  # autoload off
    with off.test_request_context("/v1/chat/completions", method="POST"):
        with pytest.raises(Refused) as info:
            with use_model(repo, "generate"):
                pass
    assert as_api_error(info.value).status == 404

    app = make_app(AUTOLOAD=True, API_KEYS=["plain"], ADMIN_API_KEYS=["admin"])
    with app.test_request_context("/v1/chat/completions", method="POST", headers=auth("plain")):
        app.preprocess_request()
        with pytest.raises(Refused) as info:
            with use_model(repo, "generate"):
                pass
        assert as_api_error(info.value).status == 404
    assert registry.find(repo) is None
    with app.test_request_context("/v1/chat/completions", method="POST", headers=auth("admin")):
        app.preprocess_request()
        with use_model(repo, "generate") as entry:
            assert entry.id == repo and entry.active == 1
        with pytest.raises(Refused):  # a hub id that is not cached is never fetched
            with use_model("someorg/not-cached", "generate"):
                pass
