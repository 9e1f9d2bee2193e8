"""What the generation and embedding schedulers share: one thread per model
fed by a bounded queue, and the errors that go back to the
waiting request threads."""
from __future__ import annotations

import threading
import time
from collections import deque

from . import omp
from .errors import ModelClosed, QueueFull, QueueTimeout


# When a model worker last woke up to work, and which (its id(): no reference, an unloaded
# model's worker must go): one keeping its OpenMP threads while idle (keep_pool_s) hands them
# back within POOL_POLL_S of another's waking.
_woke: tuple[float, int] = (0.0, 0)
POOL_POLL_S = 0.05


class ModelWorker:
    """Subclasses implement ``_run`` and end it when ``_closing`` is set; the
    owner calls ``start()`` once the worker is built."""

    # Seconds an idle worker keeps its OpenMP threads after work (``_pool_warm``
    # set by the subclass's steps) before handing them back: 0 hands them back at once.
    keep_pool_s = 0.0

    def __init__(self, model_id: str, config, kind: str) -> None:
        self.model_id = model_id
        self.max_queue = max(0, int(config.MAX_QUEUE))
        self.queue_timeout = float(config.QUEUE_TIMEOUT)
        self._cond = threading.Condition()
        self._waiting: deque = deque()
        self._closing: str | None = None
        self._pool_warm = False               # a step ran since the last wait (subclasses set it)
        self._kept_since: float | None = None   # idle since, its OpenMP workers kept
        self._thread = threading.Thread(target=self._run, name=f"llmhost-{kind}:{model_id}",
                                        daemon=True)

    def start(self):
        """Start the worker's thread; returns the worker."""
        self._thread.start()
        return self

    def _run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _idle_wait(self) -> None:
        """Wait once (holding ``_cond``) for work or close; the caller looks
        again when it returns. This thread's OpenMP workers are handed back
        first: an idle worker must not slow the others' parallel work (omp.py).
        Right after work they are kept up to ``keep_pool_s`` first, unless
        another model worker wakes meanwhile: work that comes back within it
        does not make them anew (omp.py says what that costs)."""
        global _woke
        now = time.monotonic()
        if self._pool_warm:                  # the first wait after work
            self._pool_warm = False
            self._kept_since = now if self.keep_pool_s else None
        kept = self._kept_since
        other_woke = kept is not None and _woke[0] > kept and _woke[1] != id(self)
        if kept is not None and now - kept < self.keep_pool_s and not other_woke:
            woken = self._cond.wait(min(self.keep_pool_s - (now - kept), POOL_POLL_S))
        else:
            self._kept_since = None
            omp.release()
            woken = self._cond.wait()
        if woken:
            _woke = (time.monotonic(), id(self))

    def _enqueue(self, item) -> None:
        """Queue `item` for the thread: ModelClosed once the model is closing,
        QueueFull (at once) when LLMHOST_MAX_QUEUE requests already wait."""
        with self._cond:
            if self._closing:
                raise self._closed_error()
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(self.model_id, len(self._waiting))
            self._waiting.append(item)
            self._cond.notify()

    def close(self, reason: str) -> None:
        """Fail everything waiting or running with `reason` and stop the thread."""
        with self._cond:
            self._closing = reason
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    def _closed_error(self) -> ModelClosed:
        return ModelClosed(self._closing or f"The model '{self.model_id}' was unloaded.")

    def _timeout_error(self) -> QueueTimeout:
        return QueueTimeout(self.model_id, self.queue_timeout)
