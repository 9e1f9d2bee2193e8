"""Shared test helpers: a real gunicorn process, the official schemas."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from functools import lru_cache

import requests
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMAS = os.path.join(ROOT, "tests", "data", "openai_schemas.json")


def _nullable(node):
    """OpenAPI 3.0's `nullable: true` (used by the stream chunk schema for
    `finish_reason`, `logprobs`, `usage`) is not JSON Schema: read it as
    `anyOf: [node, null]`, which is what it means."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@lru_cache(maxsize=None)
def _validator(name: str) -> Draft202012Validator:
    with open(SCHEMAS) as fh:
        doc = _nullable(json.load(fh))
    resource = DRAFT202012.create_resource(doc)
    registry = Registry().with_resource("openai", resource)
    return Draft202012Validator({"$ref": f"openai#/components/schemas/{name}"}, registry=registry)


def validate(body: dict, name: str) -> dict:
    """Raise if `body` does not validate against the official OpenAI schema `name`."""
    _validator(name).validate(body)
    return body


def assert_error(response, status: int, param: str | None = "__any__") -> dict:
    """An OpenAI error envelope with this status (and param, when given), from a
    `requests` response or a Flask test-client one."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.get_json() if hasattr(response, "get_json") else response.json()
    validate(body, "ErrorResponse")
    if param != "__any__":
        assert body["error"]["param"] == param, body
    assert body["error"]["message"]
    return body["error"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`gunicorn wsgi:app` on a loopback port, as a user runs it."""

    def __init__(self, env: dict | None = None, log_path: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "LLMHOST_HOST": "127.0.0.1", "LLMHOST_PORT": str(self.port),
                    **(env or {})}
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
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "wsgi:app"], cwd=ROOT,
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
        with open(f"/proc/{self.worker_pid()}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def load(self, model: str, **options) -> dict:
        r = requests.post(self.url + "/v1/models", json={"model": model, **options}, timeout=600)
        assert r.status_code in (200, 201), r.text
        return r.json()


def readme_block(marker: str) -> str:
    """The code block of README.md between `<!-- marker:begin -->` and `<!-- marker:end -->`."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    assert begin in text and end in text, f"README.md lost its {marker} markers"
    block = text.split(begin, 1)[1].split(end, 1)[0].strip()
    lines = block.splitlines()
    assert lines[0].startswith("```") and lines[-1] == "```", block
    return "\n".join(lines[1:-1])
