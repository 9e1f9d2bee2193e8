"""Helpers for the chat and completions tests: raw SSE reading (to check the
framing itself, not just what the SDK makes of it) and the transformers
reference."""
from __future__ import annotations

import json

import requests
import torch

from support import validate


def post(server, path: str, body: dict) -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=300)


def sse(server, path: str, body: dict, schema: str | None = None) -> tuple[requests.Response, list[dict]]:
    """POST a streaming request; check every event is `data: <json>\\n\\n`, the
    last is [DONE]; validate each chunk against `schema`; return the chunks."""
    r = requests.post(server.url + path, json={**body, "stream": True}, timeout=300, stream=True)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["Cache-Control"] == "no-cache" and r.headers["X-Accel-Buffering"] == "no"
    raw = r.content.decode("utf-8")        # strict: the stream itself is valid UTF-8
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", raw[-200:]
    chunks = []
    for event in events[:-2]:
        assert event.startswith("data: "), event
        chunk = json.loads(event[len("data: "):])
        if schema and "error" not in chunk:
            validate(chunk, schema)
        chunks.append(chunk)
    return r, chunks


def reference(ref, ids: list[int], max_tokens: int) -> list[int]:
    """Greedy `generate` in-process: the new ids, EOS included when reached."""
    _, model = ref
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def eos_ids(ref) -> set[int]:
    tok, model = ref
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}

