"""Shared test helpers: a real gunicorn process, the official schemas."""
from __future__ import annotations

import json
import os
import textwrap
import time
from functools import lru_cache

import requests
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from llmhost.server.process import Server, free_port  # noqa: F401  (one copy, shared with the benchmark)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMAS = os.path.join(ROOT, "tests", "data", "openai_schemas.json")

# What tests/conftest.py points at temporary folders for the whole run; a user's
# shell, as `user_env` builds it for the command line, keeps them.
PRIVATE = ("LLMHOST_STATE_DIR", "LLMHOST_CACHE_DIR", "LLMHOST_TEST_LOGS")


def user_env(**extra: str) -> dict:
    """os.environ as a user's shell has it, with no LLMHOST_* settings (so the
    commands' own defaults are what is tested), except the run's private state
    folder: a test's server never writes into the user's data folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMHOST_") or k in PRIVATE}
    return {**env, **extra}


# Keys and origin of the `secure` server (conftest.py).
ENV_KEY = "sk-env-4f1c0a9e7b2d"
FILE_KEY = "sk-file-9d3e77c1a0b4"
ADMIN_KEY = "sk-admin-1b8f2c6d5e3a"
WRONG_KEY = "sk-wrong-77aa31cc09ef"
ORIGIN = "https://app.example"


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


def counts(usage: dict) -> dict:
    """A usage object without its details (cached_tokens varies with what the
    server's prefix cache holds: tests/test_prefix_cache.py checks it)."""
    return {k: v for k, v in usage.items() if not k.endswith("_details")}


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


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    """Poll until `predicate()` is truthy; return that value (fail after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s")


def scrape(server: Server) -> dict:
    """{(sample name, frozenset(labels)): value} from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def sample(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def json_log_lines(server: Server) -> list[dict]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def loaded_ids(server: Server) -> list[str]:
    return [m["id"] for m in requests.get(server.url + "/v1/models").json()["data"]]


def load_local(path: str, model_id: str, config=None, **options):
    """Load into this process's registry with `config` (TestConfig() by default)."""
    from llmhost.config import TestConfig
    from llmhost.models.loading import LoadSpec
    from llmhost.models.registry import registry

    spec = LoadSpec(model=path, id=model_id, device="cpu", **options)
    return registry.load(spec, config or TestConfig())[0]


def readme_block(marker: str, page: str = "README.md") -> str:
    """The code block of README.md (or a page under docs/, e.g. "docs/tools.md")
    between `<!-- marker:begin -->` and `<!-- marker:end -->`."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as fh:
        text = fh.read()
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    assert begin in text and end in text, f"{page} lost its {marker} markers"
    block = textwrap.dedent(text.split(begin, 1)[1].split(end, 1)[0].strip("\n")).strip()
    lines = block.splitlines()
    assert lines[0].startswith("```") and lines[-1] == "```", block
    return "\n".join(lines[1:-1])
