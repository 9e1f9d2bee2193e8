"""Where models may come from (LLMHOST_MODEL_DIRS, LLMHOST_ALLOW_DOWNLOADS) and
the body-size limit."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import time

import requests

from support import ADMIN_KEY, ENV_KEY, assert_error, auth


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
