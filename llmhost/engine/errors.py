"""What can go wrong in the engine, in the engine's own terms. The engine knows
nothing of HTTP: errors.py maps each of these to a status, a message with the
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


class InvalidInput(EngineError):
    """Input only the model can judge (template, vocabulary, length) is wrong;
    `param` names the request field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def failure(exc: BaseException, model_id: str, doing: str, hint: str) -> EngineError:
    """What the waiting requests get when a forward pass failed (a bug or OOM
    must reach them, never hang them)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return EngineOutOfMemory(model_id, doing, hint)
    return EngineFailure(doing, type(exc).__name__)
