"""What the generation and embedding schedulers share: one thread per model
fed by a bounded queue (DESIGN rule 7), and the errors that go back to the
waiting request threads."""
from __future__ import annotations

import threading
from collections import deque

import torch

from ..errors import APIError


class ModelWorker:
    """Subclasses set their own state, then call ``super().__init__`` (which
    starts the thread), implement ``_run`` and end it when ``_closing`` is set."""

    def __init__(self, model_id: str, config, kind: str) -> None:
        self.model_id = model_id
        self.max_queue = max(0, int(config.MAX_QUEUE))
        self.queue_timeout = float(config.QUEUE_TIMEOUT)
        self._cond = threading.Condition()
        self._waiting: deque = deque()
        self._closing: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"llmhost-{kind}:{model_id}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _enqueue(self, item) -> None:
        """Queue `item` for the thread: 503 once the model is closing, 429 (with
        Retry-After, at once) when LLMHOST_MAX_QUEUE requests already wait."""
        with self._cond:
            if self._closing:
                raise APIError(503, self._closing, code="model_unloaded")
            if len(self._waiting) >= self.max_queue:
                raise APIError(429, f"The model '{self.model_id}' has {len(self._waiting)} requests "
                                    "waiting (LLMHOST_MAX_QUEUE); retry shortly.",
                               code="queue_full", headers={"Retry-After": "1"})
            self._waiting.append(item)
            self._cond.notify()

    def close(self, reason: str) -> None:
        """Fail everything waiting or running with `reason` and stop the thread."""
        with self._cond:
            self._closing = reason
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    def _closed_error(self) -> APIError:
        return APIError(503, self._closing or "The model was unloaded.", code="model_unloaded")

    def _timeout_error(self) -> APIError:
        return APIError(503, f"The request waited more than {self.queue_timeout:g} s for "
                             f"'{self.model_id}' (LLMHOST_QUEUE_TIMEOUT); retry later.",
                        code="queue_timeout", headers={"Retry-After": "5"})

    def _failure(self, exc: Exception, doing: str, hint: str) -> APIError:
        """What the waiting requests get when a forward pass failed (a bug or OOM
        must reach them, never hang them)."""
        if isinstance(exc, torch.OutOfMemoryError):
            return APIError(503, f"Out of memory while {doing} on '{self.model_id}'; retry with "
                                 f"{hint}.", code="out_of_memory")
        return APIError(500, f"The server had an error while {doing}: {type(exc).__name__}. "
                             "Please retry.", type="server_error")
