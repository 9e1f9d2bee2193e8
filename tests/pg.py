"""A throwaway PostgreSQL cluster for the tests (tests/test_store_pg.py,
tests/test_scaleout.py): Debian's `postgresql` binaries (`.ci/run` installs
them), started as the `postgres` user on a free loopback port with its unix
socket in the temporary folder, stopped at the end of the session. Skips, with
the reason, where the binaries, the user or the psycopg driver are missing."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid

import pytest


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: str, port: int) -> None:
        self.root = root
        self.port = port

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh empty database; its SQLAlchemy URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_postgres(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL cluster (a Cluster: .url(), .new_database())."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("the psycopg driver is missing: pip install 'psycopg[binary]'")
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no `postgres` user to run the cluster as (Debian's postgresql package adds it)")
    if os.geteuid() != 0 or not shutil.which("runuser"):
        pytest.skip("starting PostgreSQL as the `postgres` user needs root (runuser)")
    root = tempfile.mkdtemp(prefix="llmhost-pg-")
    os.chown(root, user.pw_uid, user.pw_gid)
    data = os.path.join(root, "data")
    done = _as_postgres(initdb, "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8")
    assert done.returncode == 0, done.stderr
    port = _free_port()
    done = _as_postgres(pg_ctl, "-D", data, "-l", os.path.join(root, "log"), "-w", "-o",
                        f"-c listen_addresses=127.0.0.1 -p {port} -k {root} "
                        "-c max_connections=200 -c fsync=off", "start")
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        yield Cluster(root, port)
    finally:
        _as_postgres(pg_ctl, "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres) -> str:
    """A fresh empty PostgreSQL database for one test."""
    return postgres.new_database()
