"""What the generation and embedding schedulers share: one thread per model
fed by a bounded queue, and the errors that go back to the
waiting request threads."""
from __future__ import annotations

import threading
from collections import deque

from . import omp
from .errors import ModelClosed, QueueFull, QueueTimeout


class ModelWorker:
    """Subclasses implement ``_run`` and end it when ``_closing`` is set; the
    owner calls ``start()`` once the worker is built."""

    def __init__(self, model_id: str, config, kind: str) -> None:
        self.model_id = model_id
        self.max_queue = max(0, int(config.MAX_QUEUE))
        self.queue_timeout = float(config.QUEUE_TIMEOUT)
        self._cond = threading.Condition()
        self._waiting: deque = deque()
        self._closing: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"llmhost-{kind}:{model_id}",
                                        daemon=True)

    def start(self):
        """Start the worker's thread; returns the worker."""
        self._thread.start()
        return self

    def _run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _idle_wait(self) -> None:
        """Wait (holding ``_cond``) for work or close, this thread's OpenMP
        workers handed back first: an idle worker must not slow the others'
        parallel work (omp.py)."""
        omp.release()
        self._cond.wait()

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
