"""Server paths are for operators: callers that are neither admins nor on a
keyless server see `<path:1a2b3c4d>` instead of a folder or file of the server
(model sources loaded by path, LLMHOST_MODEL_DIRS, LLMHOST_MODELS entries, the
Hugging Face cache), in error messages, /ready, GET /v1/models and /metrics.

Why replace known paths rather than anything that looks like one: messages
also hold routes (`POST /v1/models`) and the client's own input, which must
stay readable. The short hash keeps two paths apart, and an operator can match
it with `python -c "import hashlib; print(hashlib.sha256(b'/path').hexdigest()[:8])"`."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable

from flask import Flask, current_app, has_request_context

from ..config import settings
from ..models.ondisk import is_path  # noqa: F401  (redact.is_path: the routes use it too)

@dataclass
class Redaction:
    """Who may see paths (`viewer()`, for the caller of this request) and which
    paths the server knows (each of `sources()` lists some: model folders,
    caches). create_app wires them from the modules that know (auth, the
    model registry), so this module imports neither."""

    viewer: Callable[[], bool]
    sources: tuple[Callable[[], Iterable[str]], ...] = ()


def init_app(app: Flask, viewer: Callable[[], bool],
             sources: tuple[Callable[[], Iterable[str]], ...] = ()) -> None:
    app.extensions["llmhost_redact"] = Redaction(viewer, tuple(sources))


def _wiring() -> Redaction | None:
    return current_app.extensions.get("llmhost_redact") if has_request_context() else None


def may_see_paths() -> bool:
    """Outside a request (logs, the CLI) the operator reads; in a request,
    only a caller the app's viewer lets through, and nobody when the app
    wired no viewer."""
    if not has_request_context():
        return True
    wiring = _wiring()
    return wiring is not None and wiring.viewer()


def label(path: str) -> str:
    return "<path:" + hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:8] + ">"


def known_paths() -> list[str]:
    """Longest first, so a folder inside another is replaced whole."""
    paths: set[str] = set()
    wiring = _wiring()
    for source in wiring.sources if wiring is not None else ():
        try:
            paths.update(p for p in source() if p)
        except Exception:   # a path source must never turn an error message into a 500
            pass
    for name in ("HF_HOME", "HF_HUB_CACHE", "HOME"):
        if os.environ.get(name):
            paths.add(os.environ[name])
    if has_request_context():
        for folder in settings().MODEL_DIRS or []:
            paths.add(folder)
            paths.add(os.path.realpath(os.path.expanduser(folder)))
        preload = current_app.extensions.get("llmhost_preload")
        for item in getattr(preload, "items", None) or []:
            value = item if isinstance(item, str) else (item or {}).get("model") if isinstance(item, dict) else None
            if isinstance(value, str) and is_path(value):
                paths.add(value)
                paths.add(os.path.abspath(os.path.expanduser(value)))
    return sorted((p.rstrip("/") for p in paths if p and len(p.rstrip("/")) > 1),
                  key=len, reverse=True)


def text(value: str, force: bool = False) -> str:
    """`value` with server paths replaced, unless the caller may see them."""
    if not value or (not force and may_see_paths()):
        return value
    for path in known_paths():
        if path in value:
            value = value.replace(path, label(path))
    return value


def model_id(value: str, force: bool = False) -> str:
    if not force and may_see_paths():
        return value
    return label(value) if is_path(value) else value
