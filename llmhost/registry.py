"""The one owner of loaded models.

A guard lock hands out one lock per model id. Loading happens under that id's
lock and is checked again inside it, so two concurrent loads of one model load
it once, and loading model B never blocks requests to model A (they only touch
the guard for a dictionary lookup).
"""
from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch

from . import loading
from .errors import APIError

log = logging.getLogger("llmhost")


@dataclass
class ModelEntry:
    id: str
    spec: loading.LoadSpec
    loaded: loading.Loaded
    load_seconds: float
    created: int = field(default_factory=lambda: int(time.time()))
    engine: Any = None
    last_used: float = field(default_factory=time.monotonic)
    active: int = 0

    @property
    def task(self) -> str:
        return self.loaded.task

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def to_openai(self) -> dict:
        ld = self.loaded
        return {
            "id": self.id, "object": "model", "created": self.created, "owned_by": "llmhost",
            "status": "loaded", "task": ld.task, "source": self.spec.model,
            "gguf_file": self.spec.gguf_file, "device": ld.device, "dtype": ld.dtype,
            "parameters": ld.parameters, "memory_bytes": ld.memory_bytes,
            "load_seconds": round(self.load_seconds, 3), "revision": ld.revision,
            "max_context": ld.max_context, "keep_alive": self.spec.keep_alive,
            **{key: ld.extra[key] for key in ("dimensions",) if key in ld.extra},
        }


def _same_options(a: loading.LoadSpec, b: loading.LoadSpec) -> list[str]:
    """Options of two specs for one id that differ (only those the client set)."""
    diffs = []
    for name in ("model", "device", "dtype", "revision", "gguf_file", "task"):
        va, vb = getattr(a, name), getattr(b, name)
        if vb not in (None, "auto") and va != vb:
            diffs.append(f"{name}={vb!r} (loaded with {va!r})")
    return diffs


def release_memory() -> None:
    """Give freed memory back: CUDA's cache and glibc's free lists."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ModelRegistry:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._models: dict[str, ModelEntry] = {}
        self._loading: set[str] = set()
        self.config = None

    def init_app(self, app) -> None:
        self.config = app.config["LLMHOST"]
        app.extensions["llmhost_registry"] = self

    # -- queries --------------------------------------------------------------
    def list(self) -> list[ModelEntry]:
        with self._guard:
            return list(self._models.values())

    def loading(self) -> list[str]:
        with self._guard:
            return sorted(self._loading)

    def find(self, model_id: str) -> ModelEntry | None:
        # An absolute path used as an id loses its leading slash in a URL path.
        with self._guard:
            return self._models.get(model_id) or self._models.get("/" + model_id)

    def get(self, model_id: str, param: str = "model") -> ModelEntry:
        entry = self.find(model_id)
        if entry is None:
            loaded = ", ".join(e.id for e in self.list()) or "none"
            raise APIError(404, f"The model '{model_id}' is not loaded (loaded models: {loaded}). "
                                f"Load it first with POST /v1/models {{\"model\": \"{model_id}\"}}.",
                           param=param, code="model_not_found")
        return entry

    @contextmanager
    def use(self, model_id: str, task: str | None = None) -> Iterator[ModelEntry]:
        """Mark a model busy for the length of a request."""
        entry = self.get(model_id)
        if task and entry.task != task:
            what = {"generate": "text generation (chat and completions)", "embed": "embeddings"}
            raise APIError(400, f"The model '{model_id}' serves {what[entry.task]}, not "
                                f"{what[task]}. Load a model for that task.", param="model",
                           code="wrong_model_task")
        with self._guard:
            entry.active += 1
            entry.last_used = time.monotonic()
        try:
            yield entry
        finally:
            with self._guard:
                entry.active -= 1
                entry.last_used = time.monotonic()

    # -- lifecycle ------------------------------------------------------------
    def load(self, spec: loading.LoadSpec) -> tuple[ModelEntry, bool]:
        """Load a model once; (entry, True) when it was loaded by this call."""
        model_id = spec.served_id
        with self._guard:
            lock = self._locks.setdefault(model_id, threading.Lock())
        with lock:
            existing = self.find(model_id)
            if existing is not None:
                diffs = _same_options(existing.spec, spec)
                if diffs:
                    raise APIError(409, f"The model '{model_id}' is already loaded with other options: "
                                        f"{'; '.join(diffs)}. Unload it first, or load it under another "
                                        "'id'.", param="model", code="model_conflict")
                return existing, False
            with self._guard:
                self._loading.add(model_id)
            try:
                started = time.perf_counter()
                loaded = loading.load(spec, self.config)
                entry = ModelEntry(id=model_id, spec=spec, loaded=loaded,
                                   load_seconds=time.perf_counter() - started)
                from . import engine
                entry.engine = engine.start(entry, self.config)
            finally:
                with self._guard:
                    self._loading.discard(model_id)
            with self._guard:
                self._models[model_id] = entry
            log.info("loaded %s (%s on %s, %.1fs)", model_id, entry.loaded.dtype,
                     entry.loaded.device, entry.load_seconds)
            return entry, True

    def unload(self, model_id: str) -> ModelEntry:
        with self._guard:
            lock = self._locks.setdefault(model_id, threading.Lock())
        with lock:
            entry = self.get(model_id)
            with self._guard:
                self._models.pop(entry.id, None)
            if entry.engine is not None:
                entry.engine.close(f"The model '{model_id}' was unloaded while this request was running.")
            entry.engine = None
            entry.loaded = None  # type: ignore[assignment]
            release_memory()
            log.info("unloaded %s", model_id)
            return entry

    def unload_all(self) -> None:
        for entry in self.list():
            try:
                self.unload(entry.id)
            except APIError:
                pass


registry = ModelRegistry()
