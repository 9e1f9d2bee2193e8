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

from flask import current_app, has_request_context, request


def may_see_paths() -> bool:
    if not has_request_context():
        return True
    keys = current_app.extensions.get("llmhost_keys")
    if keys is None or not keys.enabled:
        return True
    from .auth import ENVIRON_ADMIN, _bearer
    if ENVIRON_ADMIN in request.environ:           # a /v1 route: the key was checked
        return bool(request.environ[ENVIRON_ADMIN])
    token = _bearer()                               # open routes (/ready, /metrics)
    if token is None:
        return False
    valid, admin = keys.check(token)
    return valid and (admin or not keys.admin)


def label(path: str) -> str:
    return "<path:" + hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:8] + ">"


def is_path(value: str | None) -> bool:
    return bool(value) and (value.startswith(("/", "./", "../", "~")) or os.sep in value
                            and os.path.exists(value))


def known_paths() -> list[str]:
    """Longest first, so a folder inside another is replaced whole."""
    from .registry import registry
    paths: set[str] = set()
    try:
        from .loading import hub_cache_dir
        paths.add(hub_cache_dir())
    except Exception:
        pass
    for name in ("HF_HOME", "HF_HUB_CACHE", "HOME"):
        if os.environ.get(name):
            paths.add(os.environ[name])
    config = registry.config
    for folder in getattr(config, "MODEL_DIRS", None) or []:
        paths.add(folder)
        paths.add(os.path.realpath(os.path.expanduser(folder)))
    for entry in registry.list():
        for value in (entry.id, entry.spec.model):
            if is_path(value):
                paths.add(value)
                paths.add(os.path.abspath(os.path.expanduser(value)))
    if has_request_context():
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
