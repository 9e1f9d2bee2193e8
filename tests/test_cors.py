"""CORS: allowed origins get headers (401s included), others none."""
from __future__ import annotations

import requests

from support import ENV_KEY, ORIGIN, auth


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
