"""Progress of the model loads under way, for GET /v1/models and streamed loads.

A load is tracked from the moment the registry starts it until it ends: its
phase (``resolving``, ``downloading``, ``loading``), the bytes downloaded from
the Hub with their total, and the tensors (or checkpoint shards) read so far.

Where the numbers come from: huggingface_hub's ``snapshot_download`` reports
downloaded bytes to the ``tqdm_class`` it is given (llmhost/models/loading.py passes
:func:`hub_tqdm`); transformers has no callback for weights, only tqdm bars
("Loading weights" over tensors, "Converting and de-quantizing GGUF tensors"),
so :func:`install` wraps the ``tqdm`` those two modules call and counts the
items of the bar opened on a loading thread. The wrapper changes nothing else
(the bar still shows or hides as configured), and without a tracked load on the
thread it returns the bar untouched.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger("llmhost")

_guard = threading.Lock()
_active: dict[str, "Tracker"] = {}
_local = threading.local()
_installed = False


class Tracker:
    """One load's progress; readers wait on `changed` for the next update."""

    def __init__(self, model_id: str, source: str) -> None:
        self.id = model_id
        self.source = source
        self.started = time.monotonic()
        self.created = int(time.time())
        self.phase = "resolving"
        self.downloaded = 0
        self.download_total = 0
        self.done = 0
        self.total = 0
        self.what = ""
        self.finished = False
        self.version = 0
        self.changed = threading.Condition()

    def update(self, **fields: Any) -> None:
        with self.changed:
            for name, value in fields.items():
                setattr(self, name, value)
            self.version += 1
            self.changed.notify_all()

    def wait(self, version: int, timeout: float) -> int:
        """Block until an update after `version` (or the timeout); the new version."""
        with self.changed:
            if self.version == version and not self.finished:
                self.changed.wait(timeout)
            return self.version

    def fraction(self) -> float | None:
        """Share done of the current phase, where its total is known."""
        if self.phase == "downloading" and self.download_total:
            return min(1.0, self.downloaded / self.download_total)
        if self.phase == "loading" and self.total:
            return min(1.0, self.done / self.total)
        return None

    def to_dict(self) -> dict:
        """The fields GET /v1/models and the progress events show."""
        out = {"id": self.id, "object": "model", "created": self.created, "owned_by": "llmhost",
               "status": "loading", "source": self.source, "phase": self.phase,
               "elapsed_seconds": round(time.monotonic() - self.started, 3)}
        fraction = self.fraction()
        if fraction is not None:
            out["fraction"] = round(fraction, 4)
        if self.download_total or self.downloaded:
            out["downloaded_bytes"] = self.downloaded
            out["download_total_bytes"] = self.download_total
        if self.what:
            out["step"] = self.what
        if self.total:
            out["loaded_tensors"] = self.done
            out["total_tensors"] = self.total
        return out


def active() -> list[Tracker]:
    with _guard:
        return list(_active.values())


def get(model_id: str) -> Tracker | None:
    with _guard:
        return _active.get(model_id)


def current() -> Tracker | None:
    return getattr(_local, "tracker", None)


def step(phase: str, what: str = "") -> None:
    """Say what the load on this thread does now (no-op outside a tracked load)."""
    tracker = current()
    if tracker is not None:
        tracker.update(phase=phase, what=what, done=0, total=0)


def counted(items, what: str) -> Iterator:
    """Iterate `items` (tensors), counting them into the load tracked on this
    thread, as the wrapped tqdm bars do for transformers' loaders: for llmhost's
    own loader (gguf_stream), which has no bar to wrap."""
    tracker = current()
    if tracker is None:
        yield from items
        return
    tracker.update(phase="loading", done=0, total=len(items), what=what)
    for i, item in enumerate(items, 1):
        yield item
        tracker.update(done=i)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


@contextmanager
def track(model_id: str, source: str) -> Iterator[Tracker]:
    """Track the load run inside this block, on this thread; log its start and
    end with the time it took and the memory it added (process RSS, and CUDA
    memory where there is CUDA)."""
    install()
    tracker = Tracker(model_id, source)
    with _guard:
        _active[model_id] = tracker
    _local.tracker = tracker
    rss = _rss_bytes()
    log.info("loading %s from %s (process RSS %s)", model_id, source, _mib(rss))
    try:
        yield tracker
    except BaseException as exc:
        log.warning("loading %s failed after %.1fs: %s", model_id,
                    time.monotonic() - tracker.started, getattr(exc, "message", exc))
        raise
    else:
        now = _rss_bytes()
        cuda = ""
        try:
            import torch
            if torch.cuda.is_available():
                cuda = f", CUDA allocated {_mib(torch.cuda.memory_allocated())}"
        except Exception:  # pragma: no cover - informational only
            pass
        log.info("loaded %s in %.1fs (process RSS %s, %+.0f MiB%s)", model_id,
                 time.monotonic() - tracker.started, _mib(now), (now - rss) / 2**20, cuda)
        tracker.update(finished=True)  # listed until the registry lists the model: forget()
    finally:
        _local.tracker = None
        if not tracker.finished:
            tracker.update(finished=True)
            forget(model_id, tracker)


def forget(model_id: str, tracker: Tracker | None = None) -> None:
    """Stop listing a load (the registry calls this once it lists the model, so
    that a poller never finds the model in neither list)."""
    with _guard:
        if _active.get(model_id) is (tracker or _active.get(model_id)):
            _active.pop(model_id, None)


# -- where the numbers come from ------------------------------------------------

def hub_tqdm(tracker: Tracker | None):
    """A tqdm class for snapshot_download that reports its byte bars to `tracker`.
    snapshot_download calls it from its download threads, so the tracker is bound
    here rather than looked up per thread."""
    from tqdm.auto import tqdm

    class HubProgress(tqdm):
        def __init__(self, *args, **kwargs):
            # Read from the arguments: a disabled bar (HF_HUB_DISABLE_PROGRESS_BARS)
            # does not keep its unit and description.
            self._bytes = (kwargs.get("unit") == "B"
                           and str(kwargs.get("desc") or "").startswith("Downloading"))
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if tracker is not None and n and self._bytes:
                tracker.update(phase="downloading", downloaded=tracker.downloaded + int(n),
                               download_total=int(self.total or 0))
            return super().update(n)

    return HubProgress


class _Counted:
    """A tqdm bar whose iteration also counts items into a tracker."""

    def __init__(self, bar, tracker: Tracker, total: int, what: str) -> None:
        self._bar = bar
        self._tracker = tracker
        tracker.update(phase="loading", done=0, total=total, what=what.rstrip(". "))

    def __iter__(self):
        for i, item in enumerate(self._bar, 1):
            yield item
            self._tracker.update(done=i)

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self._bar.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._bar, name)


def _counting(original):
    def tqdm(*args, **kwargs):
        bar = original(*args, **kwargs)
        tracker = current()
        iterable = args[0] if args else kwargs.get("iterable")
        if tracker is None or iterable is None:
            return bar
        try:
            total = int(kwargs.get("total") or len(iterable))
        except TypeError:
            total = 0
        return _Counted(bar, tracker, total, str(kwargs.get("desc") or ""))

    tqdm.__wrapped__ = original
    return tqdm


def install() -> None:
    """Wrap the tqdm of transformers' weight loaders (once per process)."""
    global _installed
    with _guard:
        if _installed:
            return
        _installed = True
    import importlib

    from . import lean
    lean.prepare()  # before these modules import transformers' model code (lean.py says why)
    for name in ("transformers.core_model_loading", "transformers.modeling_gguf_pytorch_utils"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # another transformers version: no tensor counts, nothing else lost
            continue
        if hasattr(module, "tqdm") and not hasattr(module.tqdm, "__wrapped__"):
            module.tqdm = _counting(module.tqdm)
