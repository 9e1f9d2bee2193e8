"""Stored responses: the SQLAlchemy store itself (expiry, many writers, a
store that cannot be written, a read-only database), and through real gunicorn
processes: a restart on the same SQLite file after parallel requests, and API keys
that each see their own responses."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from llmhost.store.responses import VERSION_TABLE, Store, StoreError
from support import Server, assert_error, validate


def _body(i, created=None) -> dict:
    return {"id": f"resp_{i}", "object": "response", "created_at": created or time.time(),
            "status": "in_progress", "output": []}


def _items(i) -> list[dict]:
    return [{"id": f"msg_{i}_{k}", "type": "message", "role": "user", "status": "completed",
             "content": [{"type": "input_text", "text": f"{i}/{k}"}]} for k in range(3)]


# -- the store ------------------------------------------------------------------------

def test_ttl_expires_old_responses(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    store = Store(url, ttl=1.0)
    store.create(_body("old"), None, _items("old"))
    assert store.get("resp_old", None, True)["id"] == "resp_old"
    time.sleep(1.2)
    assert store.get("resp_old", None, True) is None
    assert store.conversation("resp_old", None, True) is None
    # The next write removes it for good (a store without a TTL no longer finds it).
    store.create(_body("new"), None, _items("new"))
    keep_all = Store(url)
    assert keep_all.get("resp_old", None, True) is None
    assert keep_all.get("resp_new", None, True) is not None


def test_concurrent_writers_lose_nothing(tmp_path):
    """32 threads on two engines (as two processes sharing the file) each
    store and finish responses at once; every one is there afterwards."""
    url = f"sqlite:///{tmp_path}/s.db"
    stores = [Store(url), Store(url)]
    barrier = threading.Barrier(32)

    def work(t):
        store = stores[t % 2]
        barrier.wait()
        for k in range(5):
            body = _body(f"{t}_{k}")
            store.create(body, None, _items(f"{t}_{k}"))
            store.finish({**body, "status": "completed", "output": [
                {"id": f"out_{t}_{k}", "type": "message", "role": "assistant", "content": []}]})

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(work, range(32)))
    fresh = Store(url)
    for t in range(32):
        for k in range(5):
            body, items = fresh.conversation(f"resp_{t}_{k}", None, True)
            assert body["status"] == "completed"
            assert [i["id"] for i in items] == [f"msg_{t}_{k}_{n}" for n in range(3)] + \
                [f"out_{t}_{k}"]


def test_unwritable_store_is_a_clear_error_and_keeps_what_it_had(tmp_path):
    path = tmp_path / "s.db"
    Store(f"sqlite:///{path}").create(_body("kept"), None, _items("kept"))
    readonly = Store(f"sqlite:///file:{path}?mode=ro&uri=true")
    with pytest.raises(StoreError) as caught:
        readonly.create(_body("new"), None, _items("new"))
    from llmhost.http.errors import as_api_error

    assert as_api_error(caught.value).status == 500 and caught.value.code == "store_unavailable"
    assert "readonly" in caught.value.message.replace("-", "").replace(" ", "").lower()
    assert readonly.get("resp_kept", None, True)["id"] == "resp_kept"
    assert readonly.input_items("resp_kept", None, True, None, 10, "asc")[0] == _items("kept")


def test_store_from_a_newer_llmhost_is_refused(tmp_path):
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path}/s.db"
    store = Store(url)
    with store.engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(RuntimeError, match="newer llmhost"):
        Store(url)


def test_head_is_alembics_and_a_store_at_it_opens_without_alembic(tmp_path):
    """HEAD (what a store at the newest schema is checked against without
    importing Alembic) is the head of the migrations Alembic runs."""
    import subprocess
    import sys

    from alembic.script import ScriptDirectory

    from llmhost.store.responses import HEAD, _alembic

    assert ScriptDirectory.from_config(_alembic(None)).get_current_head() == HEAD
    url = f"sqlite:///{tmp_path}/s.db"
    Store(url).close()   # created and upgraded to HEAD (imports Alembic)
    code = ("import sys; from llmhost.store.responses import Store; "
            f"s = Store({url!r}); print(s.found, 'alembic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == [HEAD, "False"], out.stderr[-2000:]


def test_a_store_written_before_alembic_is_upgraded_in_place(tmp_path):
    """The layout llmhost wrote with metadata.create_all (schema version 1)."""
    import sqlite3

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.executescript("""
            CREATE TABLE llmhost_schema_version (version INTEGER PRIMARY KEY);
            INSERT INTO llmhost_schema_version VALUES (1);
            CREATE TABLE llmhost_responses (id VARCHAR(80) PRIMARY KEY, owner VARCHAR(64),
                created_at FLOAT, body JSON);
            CREATE TABLE llmhost_response_items (pk INTEGER PRIMARY KEY, response_id VARCHAR(80)
                REFERENCES llmhost_responses(id) ON DELETE CASCADE, kind VARCHAR(8),
                position INTEGER, item_id VARCHAR(80), data JSON);
            INSERT INTO llmhost_responses VALUES ('resp_old', NULL, 1.0,
                '{"id": "resp_old", "status": "completed"}');
        """)
    store = Store(f"sqlite:///{db}")
    assert store.get("resp_old", None, True)["status"] == "completed"
    store.create(_body("new"), None, _items("new"))
    assert store.get("resp_new", None, True)["status"] == "in_progress"


def test_owners_see_their_own(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/s.db")
    store.create(_body("a"), "alice", _items("a"))
    assert store.get("resp_a", "alice", False) is not None
    assert store.get("resp_a", "bob", False) is None
    assert store.get("resp_a", "root", True) is not None
    assert store.delete("resp_a", "bob", False) is False
    assert store.delete("resp_a", "alice", False) is True
    assert store.get("resp_a", "root", True) is None


# -- through gunicorn -------------------------------------------------------------------

def _create(url: str, model: str, text: str, headers=None, **extra) -> requests.Response:
    return requests.post(url + "/v1/responses", json={"model": model, "input": text,
                                                      "max_output_tokens": 2, **extra},
                         headers=headers, timeout=120)


@pytest.mark.slow  # starts its own server
def test_restart_keeps_what_parallel_requests_stored(tmp_path, tiny_models):
    env = {"LLMHOST_STATE_DIR": str(tmp_path)}
    first = Server(env=env).start()
    try:
        first.load(tiny_models["llama"], id="llama")
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: _create(first.url, "llama", f"request {i}"),
                                    range(36)))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers][:3]
        bodies = {a.json()["id"]: validate(a.json(), "Response") for a in answers}
        assert len(bodies) == 36
    finally:
        first.stop()

    second = Server(env=env).start()
    try:
        for response_id, body in bodies.items():
            r = requests.get(f"{second.url}/v1/responses/{response_id}", timeout=30)
            assert r.status_code == 200 and r.json() == body
        second.load(tiny_models["llama"], id="llama")
        some = next(iter(bodies))
        more = _create(second.url, "llama", "and then?", previous_response_id=some)
        assert more.status_code == 200, more.text
        items = requests.get(f"{second.url}/v1/responses/{more.json()['id']}/input_items",
                             params={"order": "asc"}, timeout=30).json()
        assert [i["id"] for i in items["data"]][1] == bodies[some]["output"][0]["id"]
    finally:
        second.stop()


def test_a_readonly_store_serves_reads_and_refuses_writes(tmp_path, tiny_models, make_app):
    """An app whose database cannot be written (here SQLite opened read-only) answers
    the responses stored before, refuses to store a new one with a 500 naming the
    store, and still answers `store: false` (the Flask test client: gunicorn adds
    nothing to what the store does)."""
    from support import load_local

    db = tmp_path / "llmhost.db"
    load_local(tiny_models["llama"], "ro-llama")
    writer = make_app(DATABASE_URL=f"sqlite:///{db}").test_client()
    request = {"model": "ro-llama", "input": "store me", "max_output_tokens": 2}
    bodies = [validate(writer.post("/v1/responses", json=request).get_json(), "Response")
              for _ in range(3)]

    readonly = make_app(DATABASE_URL=f"sqlite:///file:{db}?mode=ro&uri=true").test_client()
    error = assert_error(readonly.post("/v1/responses", json=request), 500)
    assert error["code"] == "store_unavailable" and error["type"] == "server_error"
    assert "store" in error["message"]
    for body in bodies:
        assert readonly.get(f"/v1/responses/{body['id']}").get_json() == body
    assert readonly.post("/v1/responses", json={**request, "store": False}).status_code == 200


@pytest.mark.slow  # starts its own server
def test_each_key_sees_its_own_responses(tmp_path, tiny_models):
    srv = Server(env={"LLMHOST_STATE_DIR": str(tmp_path), "LLMHOST_API_KEYS": "alice,bob",
                      "LLMHOST_ADMIN_API_KEYS": "root"}).start()
    keys = {name: {"Authorization": f"Bearer {name}"} for name in ("alice", "bob", "root")}
    try:
        r = requests.post(srv.url + "/v1/models", json={"model": tiny_models["llama"],
                                                         "id": "llama"},
                          headers=keys["root"], timeout=300)
        assert r.status_code == 201, r.text
        mine = _create(srv.url, "llama", "secret", headers=keys["alice"]).json()["id"]
        path = f"{srv.url}/v1/responses/{mine}"
        assert requests.get(path, headers=keys["alice"], timeout=30).status_code == 200
        assert requests.get(path, headers=keys["root"], timeout=30).status_code == 200
        assert_error(requests.get(path, headers=keys["bob"], timeout=30), 404)
        assert_error(requests.get(path + "/input_items", headers=keys["bob"], timeout=30), 404)
        assert_error(requests.delete(path, headers=keys["bob"], timeout=30), 404)
        assert_error(_create(srv.url, "llama", "x", headers=keys["bob"],
                             previous_response_id=mine), 404, "previous_response_id")
        assert_error(requests.get(path, timeout=30), 401)
        assert_error(requests.post(srv.url + "/tokenize", json={"model": "llama", "prompt": "x"},
                                   timeout=30), 401)
        assert _create(srv.url, "llama", "x", headers=keys["alice"],
                       previous_response_id=mine).status_code == 200
        assert requests.delete(path, headers=keys["alice"], timeout=30).status_code == 200
        assert_error(requests.get(path, headers=keys["root"], timeout=30), 404)
    finally:
        srv.stop()
