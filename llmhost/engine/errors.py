"""What can go wrong, in domain terms: the engine's own errors, and
:class:`Refused` with its kinds, which every layer below the routes raises
(model loading and the registry, generation, the response store). None of it
knows HTTP: http/errors.py maps each of these to a status, a message with the
LLMHOST_* setting that governs it, and the OpenAI envelope, in one place."""
from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's errors; each carries the facts the message needs."""


class QueueFull(EngineError):
    """LLMHOST_MAX_QUEUE requests already wait for this model."""

    def __init__(self, model_id: str, waiting: int) -> None:
        super().__init__(f"{waiting} requests wait for {model_id}")
        self.model_id, self.waiting = model_id, waiting


class QueueTimeout(EngineError):
    """A request waited longer than LLMHOST_QUEUE_TIMEOUT to be admitted."""

    def __init__(self, model_id: str, seconds: float) -> None:
        super().__init__(f"waited more than {seconds:g} s for {model_id}")
        self.model_id, self.seconds = model_id, seconds


class ModelClosed(EngineError):
    """The model was unloaded (before or while the request ran); `reason` says so
    in words meant for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EngineOutOfMemory(EngineError):
    """A forward pass ran out of memory; `hint` says what a retry should change."""

    def __init__(self, model_id: str, doing: str, hint: str) -> None:
        super().__init__(f"out of memory while {doing} on {model_id}")
        self.model_id, self.doing, self.hint = model_id, doing, hint


class EngineFailure(EngineError):
    """A bug or an unexpected error in the engine (the cause is logged, not told)."""

    def __init__(self, doing: str, cause: str) -> None:
        super().__init__(f"error while {doing}: {cause}")
        self.doing, self.cause = doing, cause


class Refused(EngineError):
    """What the client asked cannot be done, for a reason it is told: `message`
    (the words the client reads), `param` (the request field to blame), `code`
    (OpenAI's machine-readable code), `retry_after` (seconds, when a retry can
    work). The subclass says which kind; http/errors.py gives each its status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
        self.retry_after = retry_after


class InvalidInput(Refused):
    """The input is wrong (a field, or what only the model can judge: template,
    vocabulary, length)."""


class NotPermitted(Refused):
    """The server's settings forbid it (folders, downloads, remote code)."""


class NotFound(Refused):
    """What the request names does not exist (a model, a file, a stored item)."""


def unsupported(param: str, hint: str = "") -> "InvalidInput":
    """A known field llmhost does not support: a 400 naming it."""
    return InvalidInput(f"'{param}' is not supported by llmhost{hint}.", param=param,
                        code="unsupported_parameter")


class Conflict(Refused):
    """It clashes with what is already there (a model loaded with other options)."""


class Unavailable(Refused):
    """It cannot be done now or on this server (limits reached, no memory on the
    device, a missing package)."""


class NoRoom(Refused):
    """The memory policy (LLMHOST_MEMORY_LIMIT / headroom) leaves no room to load."""


class ServerFailure(Refused):
    """A part of the server failed (the response store); the message says what."""


def failure(exc: BaseException, model_id: str, doing: str, hint: str) -> EngineError:
    """What the waiting requests get when a forward pass failed (a bug or OOM
    must reach them, never hang them)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return EngineOutOfMemory(model_id, doing, hint)
    return EngineFailure(doing, type(exc).__name__)
