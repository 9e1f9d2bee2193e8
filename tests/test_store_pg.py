"""The response store on SQLite and on a real PostgreSQL (a throwaway cluster,
tests/pg.py): create / continue / get / delete / expiry, input_items paging
(repeated client ids too), one winner among concurrent DELETEs, two processes
opening (or `llmhost db upgrade`-ing) an empty database at once, NUL round trips,
per-key visibility, leases of responses whose server died, and the bound on
stored input."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import inspect, text

from llmhost.store.responses import Store, StoreBehind, current_revision, head_revision, upgrade

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(autouse=True)
def _close_stores(monkeypatch):
    """Every Store a test opens is closed after it (in the parent process): an
    open one keeps renewing its leases, and logged "could not renew the leases"
    once the session's PostgreSQL cluster had stopped."""
    opened: list[Store] = []
    init = Store.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(Store, "__init__", tracked)
    yield
    for store in opened:
        store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return request.getfixturevalue("pg_url")


def _open(url: str, **kw) -> Store:
    """A ready store: PostgreSQL is upgraded as `llmhost db upgrade` would."""
    store = Store(url, **kw)
    if store.dialect == "postgresql":
        upgrade(store.engine)
    return store


def _body(i, status="in_progress", created=None) -> dict:
    return {"id": f"resp_{i}", "object": "response", "created_at": created or time.time(),
            "status": status, "output": []}


def _items(i, n=3) -> list[dict]:
    return [{"id": f"msg_{i}_{k}", "type": "message", "role": "user", "status": "completed",
             "content": [{"type": "input_text", "text": f"{i}/{k}"}]} for k in range(n)]


def test_create_continue_get_delete_expire(url):
    store = _open(url, ttl=2.0)
    store.create(_body("a"), None, _items("a"))
    out = {"id": "msg_out_a", "type": "message", "role": "assistant", "content": []}
    store.finish({**_body("a", "completed"), "output": [out]})
    body, items = store.conversation("resp_a", None, True)
    assert body["status"] == "completed"
    assert [i["id"] for i in items] == ["msg_a_0", "msg_a_1", "msg_a_2", "msg_out_a"]
    store.create(_body("b"), None, items + _items("b", 1))        # a continuation
    assert store.get("resp_b", None, True)["id"] == "resp_b"
    assert store.delete("resp_a", None, True) is True
    assert store.get("resp_a", None, True) is None
    assert [i["id"] for i in store.input_items("resp_b", None, True, None, 10, "asc")[0]][:4] == \
        ["msg_a_0", "msg_a_1", "msg_a_2", "msg_out_a"]              # kept its own copy
    time.sleep(2.2)
    assert store.get("resp_b", None, True) is None                    # expired on read
    store.create(_body("c"), None, _items("c"))                        # ...and gone on write
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM llmhost_responses")).scalar() == 1


def test_input_items_page_by_position_with_repeated_client_ids(url):
    """Issue 26.8: three messages with `"id": "dup"` paged `a, b, b, b...` forever."""
    store = _open(url)
    given = [{"id": "a", "type": "message", "role": "user", "content": "0"}] + \
        [{"id": "dup", "type": "message", "role": "user", "content": str(k)} for k in (1, 2, 3)]
    store.create(_body("p"), None, given)
    for order in ("asc", "desc"):
        seen, after = [], None
        for _ in range(10):
            page, more = store.input_items("resp_p", None, True, after, 1, order)
            seen += page
            if not more:
                break
            after = page[-1]["id"]
        contents = [i["content"] for i in seen]
        assert contents == (["0", "1", "2", "3"] if order == "asc" else ["3", "2", "1", "0"])
        assert len({i["id"] for i in seen}) == 4


def test_concurrent_deletes_exactly_one_wins(url):
    """Issue 26.9: two DELETEs of one response both answered 200."""
    store = _open(url)
    for round_ in range(10):
        store.create(_body(f"d{round_}"), None, _items(round_))
        gate, won = threading.Barrier(2), []

        def remove():
            gate.wait()
            won.append(store.delete(f"resp_d{round_}", None, True))

        threads = [threading.Thread(target=remove) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(won) == [False, True], (round_, won)


def test_nul_characters_round_trip(url):
    store = _open(url)
    tricky = "a\x00b \ue000 \ue000\ue000 \\u0000 end\x00"
    item = {"id": "nul", "type": "message", "role": "user", "content": tricky, tricky: [tricky]}
    store.create({**_body("n"), "output_text": tricky}, None, [item])
    assert store.get("resp_n", None, True)["output_text"] == tricky
    assert store.input_items("resp_n", None, True, None, 5, "asc")[0] == [item]
    if store.dialect == "postgresql":        # jsonb: PostgreSQL's JSON operators work on it
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT jsonb_typeof(body), body->>'status' FROM "
                                     "llmhost_responses")).one() == ("object", "in_progress")


def test_each_key_sees_its_own(url):
    store = _open(url)
    store.create(_body("k"), "alice", _items("k"))
    assert store.get("resp_k", "alice", False) is not None
    assert store.get("resp_k", "bob", False) is None
    assert store.conversation("resp_k", "bob", False) is None
    assert store.input_items("resp_k", "bob", False, None, 5, "asc") is None
    assert store.get("resp_k", "root", True) is not None
    assert store.delete("resp_k", "bob", False) is False
    assert store.delete("resp_k", "alice", False) is True


def _died_mid_generation(url: str) -> None:      # in a child process
    store = Store(url, lease=0.5, server_id="replica-gone")
    store.create(_body("orphan"), None, _items("o"))
    os._exit(0)                                   # no finish(): the process died


def test_lease_of_a_dead_server_reads_failed_and_a_restart_fails_its_own(url):
    _open(url)
    child = multiprocessing.get_context("fork").Process(target=_died_mid_generation, args=(url,))
    child.start()
    child.join(60)
    other = Store(url, lease=0.5, server_id="replica-alive")
    assert other.get("resp_orphan", None, True)["status"] == "in_progress"
    time.sleep(0.8)
    body = other.get("resp_orphan", None, True)
    assert body["status"] == "failed" and "lease" in body["error"]["message"]
    # A live server renews its leases: its response stays in_progress.
    other.create(_body("alive"), None, _items("l"))
    time.sleep(1.2)
    assert other.get("resp_alive", None, True)["status"] == "in_progress"
    # The same server starting again marks its unfinished responses failed at once.
    again = Store(url, lease=60, server_id="replica-alive")
    assert again.fail_abandoned() == 1
    body = again.get("resp_alive", None, True)
    assert body["status"] == "failed" and "restarted" in body["error"]["message"]


def _open_and_write(url: str, gate, n: int) -> None:   # in a child process
    try:
        gate.wait(30)
        store = Store(url)
        if store.dialect == "postgresql":
            upgrade(store.engine)
        store.create(_body(f"race{n}"), None, _items(n))
        os._exit(0)
    except BaseException as exc:  # noqa: BLE001  (the parent sees the exit code)
        print(f"child {n}: {type(exc).__name__}: {exc}", file=sys.stderr)
        os._exit(1)


def test_two_processes_open_an_empty_database_ten_times(url, request, tmp_path):
    context = multiprocessing.get_context("fork")
    for round_ in range(10):
        fresh = (f"sqlite:///{tmp_path}/race{round_}.db" if url.startswith("sqlite")
                 else request.getfixturevalue("postgres").new_database())
        gate = context.Barrier(2)
        children = [context.Process(target=_open_and_write, args=(fresh, gate, 2 * round_ + k))
                    for k in range(2)]
        for c in children:
            c.start()
        for c in children:
            c.join(120)
        assert [c.exitcode for c in children] == [0, 0], f"round {round_}"
        store = Store(fresh)
        assert current_revision(store.engine) == head_revision()
        assert store.get(f"resp_race{2 * round_}", None, True) is not None
        store.engine.dispose()


def test_db_upgrade_twice_at_once(postgres):
    """`llmhost db upgrade` from two processes on an empty database (advisory lock)."""
    fresh = postgres.new_database()
    env = {**os.environ, "LLMHOST_DATABASE_URL": fresh, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-m", "llmhost", "db", "upgrade"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("upgraded from an empty database" in o for o in outputs) >= 1, outputs
    again = subprocess.run([sys.executable, "-m", "llmhost", "db", "upgrade"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already at revision" in again.stdout, again.stdout
    _assert_usage_tables_match_the_models(Store(fresh).engine)


def _assert_usage_tables_match_the_models(engine) -> None:
    """The usage tables exist, as llmhost/store/usage.py maps them (Alembic's own
    comparison of a database with models: columns, types, nullability, indexes)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from llmhost.store import usage

    names = set(usage.Base.metadata.tables)
    with engine.connect() as conn:
        assert names <= set(inspect(conn).get_table_names())
        context = MigrationContext.configure(conn, opts={
            "include_name": lambda name, kind, parent: kind != "table" or name in names})
        assert compare_metadata(context, usage.Base.metadata) == []


def test_the_usage_tables_are_migrations_and_work(url):
    """Usage and quota tables come from the migrations (SQLite: on open; PostgreSQL:
    `llmhost db upgrade`), and the usage store counts and reserves in them."""
    from llmhost.store.usage import Record, UsageStore

    store = _open(url)
    _assert_usage_tables_match_the_models(store.engine)
    usage = UsageStore(store.engine, flush_s=3600)
    for _ in range(2):
        usage.add(Record(key="k", key_name="ann", model="m", endpoint="/v1/x", requests=1,
                         prompt_tokens=4, completion_tokens=3))
    (row,) = usage.report(group_by=("key",))
    assert (row["key_name"], row["requests"], row["prompt_tokens"]) == ("ann", 2, 8)
    assert [usage.reserve("key:k", "d:2026-12-03", 40, 100) for _ in range(3)] == [True, True, False]
    assert usage.used("key:k", "d:2026-12-03") == 80
    usage.close()


def test_usage_tables_made_before_the_migration_are_kept(url):
    """A database at revision 0002 whose usage tables an older llmhost made with
    create_all upgrades to head keeping them and their rows."""
    from alembic import command
    from sqlalchemy import create_engine

    from llmhost.store import usage
    from llmhost.store.responses import _alembic

    engine = create_engine(url)
    with engine.connect() as conn:
        command.upgrade(_alembic(conn), "0002")
        conn.commit()
    usage.Base.metadata.create_all(engine)          # what llmhost did before 0003
    old = usage.UsageStore(engine, flush_s=3600)
    old.add(usage.Record(key="k", key_name=None, model="m", endpoint="/v1/x", requests=5))
    old.close()
    assert current_revision(engine) == "0002"
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    _assert_usage_tables_match_the_models(engine)
    again = usage.UsageStore(engine, flush_s=3600)
    assert [row["requests"] for row in again.report(group_by=("key",))] == [5]
    again.close()


def test_a_database_behind_says_to_run_db_upgrade(pg_url):
    store = Store(pg_url)                      # PostgreSQL never upgrades itself
    with pytest.raises(StoreBehind) as caught:
        store.get("resp_x", None, True)
    from llmhost.http.errors import as_api_error

    answer = as_api_error(caught.value)
    assert answer.status == 503 and answer.headers["Retry-After"] == "30"
    assert "llmhost db upgrade" in caught.value.message
    upgrade(store.engine)
    assert store.get("resp_x", None, True) is None


def test_stored_input_is_bounded(make_app, tmp_path):
    """Issue 26.10: nothing bounded the stored conversation (reasoning items never
    reach the prompt): a 400 naming LLMHOST_MAX_STORED_INPUT_BYTES."""
    app = make_app(MAX_STORED_INPUT_BYTES=100_000, STATE_DIR=str(tmp_path))
    big = [{"type": "reasoning", "id": "rs_1", "summary": [],
            "content": [{"type": "reasoning_text", "text": "x" * 200_000}]},
           {"role": "user", "content": "hi"}]
    r = app.test_client().post("/v1/responses", json={"model": "nope", "input": big})
    assert r.status_code == 400, r.get_json()
    error = r.get_json()["error"]
    assert error["param"] == "input" and "LLMHOST_MAX_STORED_INPUT_BYTES" in error["message"]
    r = app.test_client().post("/v1/responses", json={"model": "nope", "input": big,
                                                       "store": False})
    assert r.status_code == 404                  # not stored: not bounded by it
