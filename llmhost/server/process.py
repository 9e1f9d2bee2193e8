"""`gunicorn wsgi:app` from this checkout as a child process on a free loopback
port, as a user runs it: what the benchmark (``--serve``) and the end-to-end
tests start."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One gunicorn process; its output goes to `log_path`."""

    def __init__(self, env: dict | None = None, log_path: str | None = None,
                 bind_flag: bool = False):
        """`bind_flag`: the address as gunicorn's `-b` rather than LLMHOST_HOST /
        LLMHOST_PORT (which are then unset), as a user may start replicas."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["-b", f"127.0.0.1:{self.port}"] if bind_flag else []
        address = {} if bind_flag else {"LLMHOST_HOST": "127.0.0.1", "LLMHOST_PORT": str(self.port)}
        base = {k: v for k, v in os.environ.items()
                if not (bind_flag and k in ("LLMHOST_HOST", "LLMHOST_PORT"))}
        self.env = {**base, **address, **(env or {})}
        self.log_path = log_path or os.path.join(
            os.environ.get("LLMHOST_TEST_LOGS", "/tmp"), f"llmhost-gunicorn-{self.port}.log")
        self.proc: subprocess.Popen | None = None

    def start(self, wait_for: str = "/health", timeout: float = 120) -> "Server":
        try:
            return self._start(wait_for, timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, wait_for: str, timeout: float) -> "Server":
        import requests

        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "wsgi:app", *self.args],
                                     cwd=ROOT,
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log()[-3000:]}")
            try:
                if requests.get(self.url + wait_for, timeout=5).status_code < 500:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn did not answer {wait_for}: {self.log()[-3000:]}")

    def log(self) -> str:
        with open(self.log_path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")

    def worker_pid(self) -> int:
        out = subprocess.check_output(["pgrep", "-P", str(self.proc.pid)], text=True)
        return int(out.split()[0])

    def worker_rss(self) -> int:
        return int(sum(self.worker_rss_split()) * 2**20)

    def worker_rss_split(self) -> tuple[float, float]:
        """The worker's resident memory, MiB: (its own pages, file pages: the
        libraries' code and data it maps)."""
        with open(f"/proc/{self.worker_pid()}/status") as fh:
            kib = {key: int(value.split()[0]) for key, _, value in
                   (line.partition(":") for line in fh) if key in ("RssAnon", "RssFile", "RssShmem")}
        return kib["RssAnon"] / 1024, (kib["RssFile"] + kib["RssShmem"]) / 1024

    def stop(self) -> None:
        """SIGTERM (gunicorn's graceful stop), then SIGKILL to whatever of its
        process group is left: a worker whose master died first would otherwise
        run on after the test or benchmark that started it."""
        if self.proc:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def load(self, model: str, **options) -> dict:
        import requests

        r = requests.post(self.url + "/v1/models", json={"model": model, **options}, timeout=600)
        assert r.status_code in (200, 201), r.text
        return r.json()
