"""The one owner of loaded models.

A guard lock hands out one lock per model id. Loading happens under that id's
lock and is checked again inside it, so two concurrent loads of one model load
it once, and loading model B never blocks requests to model A (they only touch
the guard for a dictionary lookup).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .. import engine
from ..engine import metrics, omp
from . import adapters, journal, loading, progress
from ..config import Config
from ..engine.errors import Conflict, InvalidInput, NotFound, Refused, Unavailable
from .checks import precheck
from .reclaim import release_code_pages, trim
from .ondisk import is_path

log = logging.getLogger("llmhost")

REAP_INTERVAL = 0.5  # seconds between keep_alive checks


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
            "gguf_file": ld.gguf_file, "device": ld.device, "dtype": ld.dtype,
            "quantization": ld.quantization,
            "parameters": ld.parameters, "memory_bytes": ld.memory_bytes,
            "load_seconds": round(self.load_seconds, 3), "revision": ld.revision,
            "max_context": ld.max_context, "keep_alive": self.spec.keep_alive,
            "aliases": list(self.spec.aliases or []),
            **{key: ld.extra[key] for key in ("dimensions", "input_modalities") if key in ld.extra},
            **({"base": self.spec.base} if self.spec.base else {}),
        }


def _conflicts(a: loading.LoadSpec, b: loading.LoadSpec) -> list[str]:
    """The options of `b` that conflict with `a`, loaded under the same id (only
    those the client set), as messages."""
    diffs = []
    for name in ("model", "device", "dtype", "revision", "gguf_file", "task", "chat_template",
                 "quantization", "base"):
        va, vb = getattr(a, name), getattr(b, name)
        if vb not in (None, "auto") and va != vb:
            diffs.append(f"{name}={vb!r} (loaded with {va!r})")
    return diffs


def release_memory() -> None:
    """Give freed memory back: CUDA's cache and glibc's free lists."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim()


class ModelRegistry:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._models: dict[str, ModelEntry] = {}
        self._loading: set[str] = set()
        # ids LLMHOST_MODELS (or the journal) will load soon (models/preload.py)
        self._expected: set[str] = set()
        self._reaper: threading.Thread | None = None

    # -- queries --------------------------------------------------------------
    def list(self) -> list[ModelEntry]:
        with self._guard:
            return list(self._models.values())

    def loading(self) -> list[str]:
        with self._guard:
            return sorted(self._loading)

    def expect(self, model_ids, coming: bool = True) -> None:
        """Ids the preload is about to load (or has tried): a request for one
        gets 503 with Retry-After, not 404, until it is loaded."""
        with self._guard:
            (self._expected.update if coming else self._expected.difference_update)(model_ids)

    def coming(self, model_id: str) -> bool:
        """Being loaded, or about to be: not served yet, but soon."""
        with self._guard:
            return bool({model_id, "/" + model_id} & (self._loading | self._expected))

    def _lookup(self, model_id: str, aliases: bool = True) -> ModelEntry | None:
        """Under the guard. An absolute path used as an id loses its leading slash
        in a URL path, so that spelling finds it too. A loaded id wins over an
        alias (load option `aliases`) of another model."""
        found = self._models.get(model_id) or self._models.get("/" + model_id)
        if found is None and aliases:
            found = next((e for e in self._models.values() if model_id in (e.spec.aliases or ())),
                         None)
        return found

    def find(self, model_id: str, aliases: bool = True) -> ModelEntry | None:
        with self._guard:
            return self._lookup(model_id, aliases)

    def get(self, model_id: str, param: str = "model") -> ModelEntry:
        entry = self.find(model_id)
        if entry is None:
            raise self._not_loaded(model_id, param)
        return entry

    def _not_loaded(self, model_id: str, param: str = "model") -> NotFound:
        with self._guard:
            return self._not_loaded_locked(model_id, param)

    def _not_loaded_locked(self, model_id: str, param: str = "model") -> Refused:
        if {model_id, "/" + model_id} & (self._loading | self._expected):
            return Unavailable(f"The model '{model_id}' is still loading on this server; retry "
                               "shortly (GET /ready?model=ID answers 200 once it serves).",
                               param=param, code="model_loading", retry_after=5)
        loaded = ", ".join(self._models) or "none"
        return NotFound(f"The model '{model_id}' is not loaded (loaded models: {loaded}). "
                        f"Load it first with POST /v1/models {{\"model\": \"{model_id}\"}}.",
                        param=param, code="model_not_found")

    def server_paths(self) -> list[str]:
        """Paths to hide from callers who are not admins (http/redact.py, wired
        in create_app): the Hugging Face cache and the models loaded from disk."""
        from huggingface_hub import constants
        paths = [constants.HF_HUB_CACHE]
        for entry in self.list():
            for value in (entry.id, entry.spec.model):
                if is_path(value):
                    paths += [value, os.path.abspath(os.path.expanduser(value))]
        return paths

    def _memory_in_use(self) -> int:
        """Bytes held by the loaded models (LLMHOST_MEMORY_LIMIT counts against it):
        their weights and what their prefix caches hold now (engine/prefixcache.py,
        each within LLMHOST_PREFIX_CACHE_MB)."""
        return sum(e.loaded.memory_bytes + _prefix_cache_bytes(e) for e in self.list()
                   if e.loaded is not None)

    def _model_lock(self, model_id: str) -> threading.Lock:
        """The id's own lock, handed out under the guard: loading, unloading and
        evicting one id are serialised; other ids are not held up."""
        with self._guard:
            return self._locks.setdefault(model_id, threading.Lock())

    def _acquire(self, model_id: str) -> ModelEntry | None:
        """Look up and mark busy in one step under the guard, so eviction can never
        pick a model between a request finding it and using it."""
        with self._guard:
            entry = self._lookup(model_id)
            if entry is not None:
                entry.active += 1
                entry.last_used = time.monotonic()
            return entry

    @contextmanager
    def use(self, model_id: str, task: str | None = None,
            autoload: Config | None = None) -> Iterator[ModelEntry]:
        """Mark a model busy for the length of a request (a stream included): a busy
        model is never evicted. Given `autoload` (the caller's settings, when the
        route found that it may load models and LLMHOST_AUTOLOAD=1), a hub id in the
        local cache is loaded first."""
        entry = self._acquire(model_id)
        if entry is None and autoload is not None and self._autoload(model_id, autoload):
            entry = self._acquire(model_id)
        if entry is None:
            raise self._not_loaded(model_id)
        try:
            if task and entry.task != task:
                what = {"generate": "text generation (chat and completions)", "embed": "embeddings",
                    "rerank": "reranking and scores", "transcribe": "speech to text"}
                raise InvalidInput(f"The model '{model_id}' serves {what[entry.task]}, not "
                                   f"{what[task]}. Load a model for that task.", param="model",
                              code="wrong_model_task")
            yield entry
        finally:
            with self._guard:
                entry.active -= 1
                entry.last_used = time.monotonic()

    # -- lifecycle ------------------------------------------------------------
    def load(self, spec: loading.LoadSpec, config: Config) -> tuple[ModelEntry, bool]:
        """Load a model once; (entry, True) when it was loaded by this call. `config`
        is the settings of the app asking (limits, allowed folders, keep_alive default)."""
        precheck(spec, config)   # before the "already loaded" shortcut
        if spec.keep_alive is None:
            spec.keep_alive = config.KEEP_ALIVE or None
        model_id = spec.served_id
        with self._model_lock(model_id):
            existing = self.find(model_id, aliases=False)
            if existing is not None:
                diffs = _conflicts(existing.spec, spec)
                if diffs:
                    raise Conflict(f"The model '{model_id}' is already loaded with other options: "
                                   f"{'; '.join(diffs)}. Unload it first, or load it under another "
                                   "'id'.", param="model", code="model_conflict")
                return existing, False
            with self._guard:
                self._loading.add(model_id)
            try:
                with progress.track(model_id, spec.model):  # GET /v1/models shows it loading
                    started = time.perf_counter()
                    if spec.base:
                        entry = self._load_adapter(spec, config)
                    else:
                        self._make_room(model_id, config.MAX_LOADED_MODELS)
                        loaded = loading.load(spec, config, in_use=self._memory_in_use())
                        entry = ModelEntry(id=model_id, spec=spec, loaded=loaded,
                                           load_seconds=0.0)
                        entry.engine = engine.start(model_id, loaded, config)
                    release_code_pages()   # the code only the load ran
                    entry.load_seconds = time.perf_counter() - started
            finally:
                with self._guard:
                    self._loading.discard(model_id)
                omp.release()   # this thread's OpenMP workers, kept, slow the model threads
            with self._guard:
                self._models[model_id] = entry
            progress.forget(model_id)
            metrics.observe_load(model_id, entry.load_seconds)
            if spec.keep_alive:
                self._start_reaper()
            return entry, True

    def _load_adapter(self, spec: loading.LoadSpec, config: Config) -> ModelEntry:
        """A LoRA adapter onto the loaded base `spec.base` (models/adapters.py):
        an entry of its own that shares the base's model, tokenizer and
        scheduler; its `loaded` counts only the adapter's parameters."""
        if spec.base == spec.served_id:
            raise InvalidInput(f"An adapter cannot be its own base: give it an 'id' other than "
                               f"'{spec.base}'.", param="base", code="invalid_base")
        base = self.get(spec.base, param="base")
        if base.spec.base or base.task != "generate" or not hasattr(base.engine, "between_steps"):
            raise InvalidInput(f"The model '{base.id}' cannot take LoRA adapters: load them "
                               "onto a loaded text generation model.", param="base",
                               code="invalid_base")
        source = loading.resolve_source(spec, config)
        if not adapters.is_adapter(source.folder):
            raise InvalidInput(f"'{spec.model}' holds no PEFT adapter (no adapter_config.json).",
                               param="model", code="model_load_failed")
        progress.step("loading", "adapter weights")
        name = adapters.peft_name(spec.served_id)
        count = adapters.attach(base.engine, name, source.folder, spec.model)
        loaded = dataclasses.replace(base.loaded, parameters=count,
                                     memory_bytes=count * base.model.dtype.itemsize,
                                     revision=source.revision)
        return ModelEntry(id=spec.served_id, spec=spec, loaded=loaded, load_seconds=0.0,
                          engine=adapters.AdapterEngine(base.engine, name))

    def adapters_of(self, model_id: str) -> list[str]:
        """The ids of the adapters loaded onto `model_id`."""
        with self._guard:
            return sorted(e.id for e in self._models.values() if e.spec.base == model_id)

    def unload(self, model_id: str, force: bool = False) -> ModelEntry:
        """Unload a model; a base with adapters only with `force` (its adapters first)."""
        with self._guard:
            if self._lookup(model_id, aliases=False) is None:   # no lock kept for ids never loaded
                raise self._not_loaded_locked(model_id)
            model_id = self._lookup(model_id).id
        users = self.adapters_of(model_id)
        if users and not force:
            raise Conflict(f"The model '{model_id}' has LoRA adapters loaded onto it: "
                           f"{', '.join(users)}. Unload them first, or unload with "
                           "force=true to unload them too.", param="model", code="model_in_use")
        for adapter in users:
            self.unload(adapter)
        with self._model_lock(model_id):
            entry = self.find(model_id, aliases=False)
            if entry is None:
                raise self._not_loaded(model_id)
            with self._guard:
                self._models.pop(entry.id, None)
            self._release(entry)
            log.info("unloaded %s", model_id)
            return entry

    def _release(self, entry: ModelEntry, wait: float = 60.0) -> None:
        """Close the engine (running and waiting requests end with a 503 saying
        why), wait for the requests holding the entry to leave, then drop the
        model so its memory goes back now rather than at some later collection."""
        if entry.engine is not None:
            entry.engine.close(f"The model '{entry.id}' was unloaded while this request was running.")
        deadline = time.monotonic() + wait
        while entry.active and time.monotonic() < deadline:
            time.sleep(0.01)
        entry.engine = None
        entry.loaded = None  # type: ignore[assignment]
        metrics.forget_model(entry.id)
        journal.forget(entry.id)
        release_memory()

    # -- memory policy ----------------------------------------------------------
    def _evict(self, model_id: str, why: str,
               still: Callable[[ModelEntry], bool] = lambda entry: True) -> bool:
        """Unload a model only if it is idle (and `still` holds) at the moment it
        is removed, checked under the guard so no request can start in between."""
        with self._model_lock(model_id):
            with self._guard:
                entry = self._models.get(model_id)
                if entry is None or entry.active or not still(entry) or any(
                        e.spec.base == model_id for e in self._models.values()):
                    return False   # a base with adapters goes only when they are unloaded
                self._models.pop(model_id)
            self._release(entry)
        log.info("unloaded %s (%s)", model_id, why)
        return True

    def _make_room(self, model_id: str, limit: int) -> None:
        """LLMHOST_MAX_LOADED_MODELS: evict the least recently used idle models until
        this one fits. Models being loaded hold a place; busy models are never evicted."""
        while limit > 0:
            with self._guard:
                bases = [e for e in self._models.values() if not e.spec.base]   # adapters are no model
                if len(bases) + len(self._loading) <= limit:
                    return
                used = {e.spec.base for e in self._models.values()}
                idle = [e for e in bases if e.active == 0 and e.id not in used]
                if not idle:
                    busy = ", ".join(sorted(self._models) + sorted(self._loading - {model_id}))
                    raise Unavailable(f"Cannot load '{model_id}': LLMHOST_MAX_LOADED_MODELS={limit} "
                                      f"and every model loaded or loading ({busy}) is serving "
                                      "requests, so none can be unloaded. Retry when they finish, "
                                      "or unload one.", param="model", code="model_limit_reached",
                                   retry_after=5)
                victim = min(idle, key=lambda e: e.last_used)
            self._evict(victim.id, f"least recently used, to load '{model_id}' within "
                                   f"LLMHOST_MAX_LOADED_MODELS={limit}")

    def reap(self) -> list[str]:
        """Unload the models idle for longer than their keep_alive."""
        def expired(entry: ModelEntry) -> bool:
            ttl = entry.spec.keep_alive
            return bool(ttl) and time.monotonic() - entry.last_used >= ttl

        candidates = [e for e in self.list() if expired(e)]
        return [e.id for e in candidates
                if self._evict(e.id, f"idle for keep_alive={e.spec.keep_alive:g}s", expired)]

    def _start_reaper(self) -> None:
        """One daemon thread per process, started by the first model with a
        keep_alive (in the gunicorn worker: threads do not survive fork)."""
        with self._guard:
            if self._reaper is not None and self._reaper.is_alive():
                return
            self._reaper = threading.Thread(target=self._reap_forever, name="llmhost-reaper",
                                            daemon=True)
            self._reaper.start()

    def _reap_forever(self) -> None:
        while True:
            time.sleep(REAP_INTERVAL)
            try:
                self.reap()
            except Exception:
                log.exception("keep_alive reaper failed; retrying")

    def _autoload(self, model_id: str, config: Config) -> bool:
        """Load a hub id found in the local cache (never downloaded)."""
        if not config.AUTOLOAD or not loading.HUB_ID.match(model_id):
            return False
        if loading.cached_snapshot(model_id, None) is None:
            return False
        log.info("autoloading %s from the local cache", model_id)
        self.load(loading.LoadSpec(model=model_id), config)
        return True


def _prefix_cache_bytes(entry: ModelEntry) -> int:
    stats = getattr(entry.engine, "stats", None)
    return int(stats().get("prefix_cache_bytes", 0)) if stats is not None else 0


registry = ModelRegistry()
