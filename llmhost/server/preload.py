"""LLMHOST_MODELS: models loaded at start-up, in the worker, in the background.

The worker starts answering at once (so /health is live while weights load) and
/ready says 503 until every entry was tried. A model that fails is logged and
listed by /ready; the others are served. Loading happens in the gunicorn worker,
never the master (gunicorn.conf.py keeps preload_app=False): CUDA state and
threads do not survive fork.
"""
from __future__ import annotations

import json
import logging
import re
import threading

from flask import Flask
from marshmallow import ValidationError

from ..api.loads import warm
from ..engine.errors import Refused
from ..http.errors import from_validation
from ..models import journal
from ..models.loading import LoadSpec
from ..models.registry import registry

log = logging.getLogger("llmhost")

DEVICE_SUFFIX = re.compile(r"^(.+)@(auto|cpu|cuda(?::\d+)?|mps)$")


def parse(value: str) -> list[dict]:
    """Entries as POST /v1/models bodies. Either `id-or-path[@device]` entries
    separated by commas (`gpt2@cpu,/models/x`), or JSON: a list of such strings
    or of load-option objects, or one object."""
    value = value.strip()
    if not value:
        return []
    if value[0] in "[{":
        try:
            data = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"LLMHOST_MODELS looks like JSON but does not parse: {exc}") from exc
        items = data if isinstance(data, list) else [data]
    else:
        items = [part.strip() for part in value.split(",") if part.strip()]
    return [_compact(item) if isinstance(item, str) else item for item in items]


def _compact(item: str) -> dict:
    match = DEVICE_SUFFIX.match(item)
    return {"model": match[1], "device": match[2]} if match else {"model": item}


def _label(item) -> str:
    if isinstance(item, dict):
        return str(item.get("id") or item.get("model") or item)
    return str(item)


class Preload:
    """Progress of the start-up loads, as /ready reports it."""

    def __init__(self, items: list) -> None:
        self.items = items
        self._lock = threading.Lock()
        self.pending = [_label(item) for item in items]
        registry.expect(self.pending)
        self.failed: list[dict] = []
        self.done = not items

    def status(self) -> dict:
        with self._lock:
            loading = sorted(set(self.pending) | set(registry.loading()))
            return {"status": "ready" if self.done else "loading",
                    "loaded": [entry.id for entry in registry.list()],
                    "loading": loading, "failed": list(self.failed)}

    def run(self, config) -> None:
        from ..schemas.models import LoadModelSchema

        for item in self.items:
            label = _label(item)
            try:
                if not isinstance(item, dict):
                    raise ValueError("each entry must be a string or an object of load options")
                args = LoadModelSchema().load(item)
                entry, created = registry.load(LoadSpec(**args), config)
                if created:
                    warm(entry)
                log.info("preloaded %s", entry.id)
            except Refused as exc:
                self._fail(label, exc.message)
            except ValidationError as exc:
                self._fail(label, from_validation(exc.messages).message)
            except ValueError as exc:
                self._fail(label, str(exc))
            except Exception as exc:
                log.exception("preloading %s crashed", label)
                self._fail(label, f"{type(exc).__name__}: {exc}")
            finally:
                with self._lock:
                    self.pending.remove(label)
                registry.expect([label], coming=False)
        with self._lock:
            self.done = True
        log.info("preload done: %d loaded, %d failed", len(self.items) - len(self.failed),
                 len(self.failed))

    def _fail(self, label: str, message: str) -> None:
        log.error("preload of %r FAILED (the server goes on without it): %s", label, message)
        with self._lock:
            self.failed.append({"model": label, "error": message})


def start(app: Flask, config) -> Preload:
    """Start loading LLMHOST_MODELS in a background thread (nothing when it is empty,
    as in the TESTING config unless a test sets it)."""
    items = parse(config.MODELS)
    listed = {_label(item) for item in items}
    # models loaded through the API before a worker crash
    items += [m for m in journal.init(config) if _label(m) not in listed]
    preload = Preload(items)
    app.extensions["llmhost_preload"] = preload
    if not preload.done:
        log.info("preloading %d models: %s", len(preload.items), ", ".join(preload.pending))

        def run() -> None:
            with app.app_context():
                preload.run(config)

        threading.Thread(target=run, name="llmhost-preload", daemon=True).start()
    return preload
