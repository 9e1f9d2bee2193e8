"""Per-key usage, rate limits with OpenAI's headers, and token quotas
(http/metering.py, http/ratelimit.py, store/usage.py)."""
from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest

from support import Server, assert_error, auth, load_local, readme_block


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """The tiny GPT-2 in this process's registry, for the Flask test clients."""
    from llmhost.models.registry import registry

    load_local(tiny_models["gpt2"], "usage-tiny")
    yield "usage-tiny"
    registry.unload("usage-tiny")


def _closed(response):
    """Read and close a test client's response: usage is counted when the
    response closes (as gunicorn closes every one)."""
    response.get_data()
    response.close()
    return response


def _complete(client, key=None, **extra):
    body = {"model": "usage-tiny", "prompt": "hello there", "max_tokens": 3, "temperature": 0,
            **extra}
    return _closed(client.post("/v1/completions", json=body, headers=auth(key) if key else {}))


def _flushed(app):
    store = app.extensions["llmhost_usage"]
    assert store.flush()
    return store


# -- keys with names -------------------------------------------------------------

def test_colon_keys_never_change_meaning_silently(make_app):
    with pytest.raises(RuntimeError, match="LLMHOST_API_KEY_NAMES=on"):
        make_app(API_KEYS=["team:secret"])
    literal = make_app(API_KEYS=["team:secret"], API_KEY_NAMES="off").test_client()
    assert literal.get("/v1/models", headers=auth("team:secret")).status_code == 200
    assert literal.get("/v1/models", headers=auth("secret")).status_code == 401
    named = make_app(API_KEYS=["team:secret"], API_KEY_NAMES="on").test_client()
    assert named.get("/v1/models", headers=auth("secret")).status_code == 200
    assert named.get("/v1/models", headers=auth("team:secret")).status_code == 401


def test_toml_keys_file_is_checked_at_start(make_app, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[keys.alice]\nkey = "a"\ngroup = "nobody"\n')
    with pytest.raises(RuntimeError, match="group 'nobody'"):
        make_app(API_KEYS_FILE=str(bad))
    bad.write_text('[keys.alice]\nkey = "a"\nrequests_per_hour = 3\n')
    with pytest.raises(RuntimeError, match="unknown fields"):
        make_app(API_KEYS_FILE=str(bad))
    bad.write_text('[keys.alice]\nkey = "a"\nsha256 = "00"\n')
    with pytest.raises(RuntimeError, match="exactly one of key, sha256"):
        make_app(API_KEYS_FILE=str(bad))


def test_the_documented_keys_file_loads(make_app, tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(readme_block("keys-file", "docs/usage.md"))
    keys = make_app(API_KEYS_FILE=str(path)).extensions["llmhost_keys"]
    assert keys.limits["groups"]["interns"]["tokens_per_day"] == 500000
    assert keys.identity("sk-alice-1").group == "interns"
    assert keys.check("sk-bob-2") == (True, False)


# -- usage -----------------------------------------------------------------------

def test_usage_totals_equal_the_usage_objects_returned(make_app, tiny, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.alice]\nkey = "alice-key"\n[keys.root]\nkey = "root-key"\n'
                    'admin = true\n')
    app = make_app(STATE_DIR=str(tmp_path), API_KEYS_FILE=str(keys), API_KEYS=["bob-key"],
                   USAGE_FLUSH_S=3600)
    client = app.test_client()
    sums = {"alice": [0, 0, 0], "bob": [0, 0, 0]}
    for who, key in (("alice", "alice-key"), ("alice", "alice-key"), ("bob", "bob-key")):
        r = _complete(client, key)
        assert r.status_code == 200, r.text
        u = r.json["usage"]
        sums[who] = [sums[who][0] + 1, sums[who][1] + u["prompt_tokens"],
                     sums[who][2] + u["completion_tokens"]]
    # a streamed chat with its usage chunk counts the same way
    r = _closed(client.post("/v1/chat/completions", headers=auth("alice-key"), json={
        "model": "usage-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}))
    events = [line for line in r.get_data(as_text=True).splitlines() if line.startswith("data: {")]
    import json
    u = json.loads(events[-1][6:])["usage"]
    sums["alice"] = [sums["alice"][0] + 1, sums["alice"][1] + u["prompt_tokens"],
                     sums["alice"][2] + u["completion_tokens"]]
    # an error after the model was reached is a request and an error
    r = _complete(client, "bob-key", max_tokens=10 ** 6)
    assert r.status_code == 400
    _flushed(app)
    r = client.get("/v1/usage?group_by=key", headers=auth("root-key"))
    assert r.status_code == 200, r.text
    rows = {row["key"]: row for row in r.json["data"]}
    assert rows["alice"]["requests"] == sums["alice"][0] == 3
    assert rows["alice"]["prompt_tokens"] == sums["alice"][1]
    assert rows["alice"]["completion_tokens"] == sums["alice"][2]
    assert rows["alice"]["errors"] == 0
    bob = [row for name, row in rows.items() if name.startswith("sha256:")]
    assert len(bob) == 1 and bob[0]["requests"] == 2 and bob[0]["errors"] == 1
    assert bob[0]["prompt_tokens"] == sums["bob"][1]
    assert "bob-key" not in r.get_data(as_text=True)
    # grouped by endpoint: chat and completions apart
    r = client.get("/v1/usage?group_by=key,endpoint&key=alice", headers=auth("root-key"))
    assert {row["endpoint"]: row["requests"] for row in r.json["data"]} == {
        "/v1/completions": 2, "/v1/chat/completions": 1}
    # a plain key sees only its own usage, and may not ask for another's
    r = client.get("/v1/usage?group_by=key", headers=auth("alice-key"))
    assert [row["key"] for row in r.json["data"]] == ["alice"]
    assert_error(client.get("/v1/usage?key=root", headers=auth("alice-key")), 403, "key")
    assert_error(client.get("/v1/usage?group_by=week", headers=auth("root-key")), 400)


def test_named_keys_get_bounded_metrics(make_app, tiny, tmp_path):
    from llmhost.engine import metrics

    app = make_app(STATE_DIR=str(tmp_path), API_KEYS=["carol:carol-key", "dave-key"],
                   API_KEY_NAMES="on")
    client = app.test_client()
    before = metrics.KEY_REQUESTS.labels("carol", "usage-tiny")._value.get()
    unnamed = metrics.KEY_REQUESTS.labels("(unnamed)", "usage-tiny")._value.get()
    assert _complete(client, "carol-key").status_code == 200
    assert _complete(client, "dave-key").status_code == 200
    deadline = time.time() + 5      # counted when the response closes
    while metrics.KEY_REQUESTS.labels("carol", "usage-tiny")._value.get() == before:
        assert time.time() < deadline
        time.sleep(0.05)
    assert metrics.KEY_REQUESTS.labels("(unnamed)", "usage-tiny")._value.get() == unnamed + 1
    text = client.get("/metrics").get_data(as_text=True)
    assert 'key="carol"' in text and "dave-key" not in text


def test_a_store_that_fails_never_blocks_serving(make_app, tiny, tmp_path):
    from llmhost.engine import metrics

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    before = metrics.USAGE_STORE_ERRORS._value.get()
    app = make_app(DATABASE_URL=f"sqlite:///{blocker}/usage.db", TOKEN_QUOTA_DAY=10 ** 6)
    client = app.test_client()
    for _ in range(2):
        assert _complete(client).status_code == 200
    assert metrics.USAGE_STORE_ERRORS._value.get() > before


def test_usage_survives_a_clean_close(tmp_path):
    from sqlalchemy import create_engine

    from llmhost.store.responses import upgrade
    from llmhost.store.usage import Record, UsageStore

    url = f"sqlite:///{tmp_path}/u.db"
    upgrade(create_engine(url))                 # the tables are the store's migrations
    store = UsageStore(create_engine(url), flush_s=3600)
    for _ in range(3):
        store.add(Record(key="k", key_name=None, model="m", endpoint="/v1/x", requests=1,
                         prompt_tokens=5, completion_tokens=2))
    store.close()
    again = UsageStore(create_engine(url), flush_s=3600)
    (row,) = again.report(group_by=("key",))
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (3, 15, 6)
    again.close()


# -- rate limits -----------------------------------------------------------------

class Clock:
    """Bucket time that moves only when a test says so (the machine is shared:
    a refill during a slow request must not change what the test reads)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _frozen(app) -> Clock:
    from llmhost.http.ratelimit import Buckets

    clock = Clock()
    app.extensions["llmhost_buckets"] = Buckets(clock=clock)
    return clock


def test_buckets_refill_at_the_limit_per_minute():
    from llmhost.http.ratelimit import Buckets, duration

    clock = Clock()
    buckets = Buckets(clock=clock)
    assert buckets.take("s", "tokens", 600, 600) == 0
    assert buckets.take("s", "tokens", 600, 30) == pytest.approx(3.0)   # 10 a second
    clock.now += 2
    assert buckets.state("s", "tokens", 600) == (20, pytest.approx(58.0))
    assert buckets.take("s", "tokens", 600, 601) == float("inf")
    buckets.give("s", "tokens", 600, -100)          # settled above the reservation
    assert buckets.state("s", "tokens", 600)[0] == 0
    assert [duration(x) for x in (0.12, 1, 59.5, 61, 360)] == ["120ms", "1s", "1m0s", "1m1s",
                                                               "6m0s"]


def test_request_limit_headers_and_429(make_app, tiny, tmp_path):
    app = make_app(STATE_DIR=str(tmp_path), RATE_LIMIT_RPM=3)
    clock = _frozen(app)
    client = app.test_client()
    for remaining in (2, 1, 0):
        r = _complete(client)
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        assert r.headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert r.headers["x-ratelimit-reset-requests"] == ["20s", "40s", "1m0s"][2 - remaining]
        assert "x-ratelimit-limit-tokens" not in r.headers
    r = _complete(client)
    err = assert_error(r, 429, None)
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
    assert "requests per min" in err["message"]
    assert r.headers["Retry-After"] == "20"
    # a route that reaches no model is not limited
    assert client.get("/v1/models").status_code == 200
    clock.now += 20       # one request's worth refilled
    assert _complete(client).status_code == 200


def test_token_limit_reserves_the_worst_case_and_settles(make_app, tiny, tmp_path):
    app = make_app(STATE_DIR=str(tmp_path), RATE_LIMIT_TPM=1000)
    _frozen(app)
    client = app.test_client()
    r = _complete(client, max_tokens=5)
    assert r.status_code == 200
    first = r.json["usage"]
    # the headers go out before the real count settles: the worst case is taken
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == 1000 - first["prompt_tokens"] - 5
    r = _complete(client, max_tokens=1)
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == \
        1000 - first["total_tokens"] - r.json["usage"]["prompt_tokens"] - 1
    small = make_app(STATE_DIR=str(tmp_path), RATE_LIMIT_TPM=100).test_client()
    err = assert_error(_complete(small, max_tokens=200), 429, None)
    assert err["type"] == "tokens" and "Request too large" in err["message"]


def test_concurrent_requests_never_over_admit(make_app, tiny, tmp_path):
    app = make_app(STATE_DIR=str(tmp_path), RATE_LIMIT_RPM=4)
    _frozen(app)
    statuses = []

    def one():
        statuses.append(_complete(app.test_client()).status_code)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] * 4 + [429] * 6


def test_daily_quota_is_refused_with_insufficient_quota(make_app, tiny, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[groups.team]\ntokens_per_day = 40\n'
                    '[keys.a]\nkey = "a-key"\ngroup = "team"\n'
                    '[keys.b]\nkey = "b-key"\ngroup = "team"\n'
                    '[keys.c]\nkey = "c-key"\n')
    app = make_app(STATE_DIR=str(tmp_path), API_KEYS_FILE=str(keys))
    client = app.test_client()
    spent = 0
    statuses = []
    for key in ("a-key", "b-key") * 6:   # the group shares one quota
        r = _complete(client, key, max_tokens=3)
        statuses.append(r.status_code)
        if r.status_code == 200:
            spent += r.json["usage"]["total_tokens"]
        else:
            err = assert_error(r, 429, None)
            assert err["code"] == "insufficient_quota" and r.headers["x-should-retry"] == "false"
    assert 200 in statuses and 429 in statuses
    assert spent <= 40
    assert _complete(client, "c-key").status_code == 200   # not in the group


def _reserve_many(url: str, results) -> None:
    from sqlalchemy import create_engine

    from llmhost.store.responses import upgrade
    from llmhost.store.usage import UsageStore

    engine = create_engine(url, connect_args={"timeout": 60})
    upgrade(engine)                             # both processes at once: one migrates
    store = UsageStore(engine, flush_s=3600)
    results.put(sum(store.reserve("group:g", "d:2026-12-03", 10, 100) for _ in range(20)))


def test_quotas_hold_across_two_processes_sharing_one_database(tmp_path):
    url = f"sqlite:///{tmp_path}/shared.db"
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_reserve_many, args=(url, results)) for _ in range(2)]
    for p in procs:
        p.start()
    admitted = results.get(timeout=120) + results.get(timeout=120)
    for p in procs:
        p.join(30)
    assert admitted == 10          # 100 tokens of quota, 10 each: never more, never fewer


# -- through a real server: the official SDK's retry -------------------------------

@pytest.fixture(scope="module")
def limited(tiny_models, tmp_path_factory):
    state = tmp_path_factory.mktemp("usage-state")
    srv = Server(env={"LLMHOST_RATE_LIMIT_RPM": "12", "LLMHOST_STATE_DIR": str(state),
                      "LLMHOST_API_KEYS": "erin:erin-key", "LLMHOST_API_KEY_NAMES": "on",
                      "LLMHOST_USAGE_FLUSH_S": "3600"}).start()
    import requests
    r = requests.post(srv.url + "/v1/models", json={"model": tiny_models["gpt2"], "id": "tiny"},
                      headers=auth("erin-key"))
    assert r.status_code in (200, 201), r.text
    yield srv, state
    srv.stop()


def test_the_sdk_retries_after_the_window_and_succeeds(limited):
    import openai
    import requests

    srv, state = limited
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1, "temperature": 0}
    with requests.Session() as http:
        while True:       # spend the bucket (12 requests, refilling one each 5 s)
            r = http.post(srv.url + "/v1/completions", json=body, headers=auth("erin-key"))
            if r.status_code == 429:
                assert 1 <= int(r.headers["Retry-After"]) <= 5
                break
            assert r.status_code == 200
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="erin-key", max_retries=3)
    raw = client.completions.with_raw_response.create(**body)
    assert raw.retries_taken >= 1       # it got a 429, waited Retry-After, and got through
    assert raw.parse().usage.completion_tokens == 1
    assert int(raw.headers["x-ratelimit-limit-requests"]) == 12


def test_cli_prints_usage_as_a_table(limited):
    from click.testing import CliRunner

    from llmhost.server.cli import main

    srv, _ = limited
    result = CliRunner().invoke(main, ["usage", "--url", srv.url, "--api-key", "erin-key",
                                       "--by", "key,model"])
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()
    assert header.split()[:3] == ["KEY", "MODEL", "REQUESTS"]
    erin = [r.split() for r in rows if r.startswith("erin")]
    assert len(erin) == 1 and erin[0][1] == "tiny" and int(erin[0][2]) >= 1


def test_a_clean_shutdown_writes_the_usage(limited):
    import sqlite3

    srv, state = limited
    srv.stop()   # SIGTERM: the worker exits cleanly and writes what it counted
    db = sqlite3.connect(os.path.join(state, "llmhost.db"))
    (count,), = db.execute(
        "select sum(requests) from llmhost_usage where key_name = 'erin'").fetchall()
    assert count >= 13      # the 12 that spent the bucket and the SDK's (429s reach no model)
