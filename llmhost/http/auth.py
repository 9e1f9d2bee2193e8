"""API keys (``Authorization: Bearer KEY``), admin scope, and the security
scheme in the OpenAPI document.

Without keys configured everything is open (the default binds to loopback only).
Once any key is set, every /v1 route needs one; probes and metrics stay open so
load balancers and Prometheus need no secret. Keys are compared in constant
time against every configured key, so timing says nothing about which key (or
how much of one) matched, and a key is never logged or echoed.
"""
from __future__ import annotations

import hashlib
import hmac
import logging

from flask import Flask, current_app, has_request_context, request

from . import redact
from .errors import APIError

log = logging.getLogger("llmhost")

DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")
ENVIRON_ADMIN = "llmhost.admin"


class Keys:
    def __init__(self, config) -> None:
        plain = list(config.API_KEYS)
        if config.API_KEYS_FILE:
            plain += read_key_file(config.API_KEYS_FILE)
        self.plain = [_digest(k) for k in plain]
        self.admin = [_digest(k) for k in config.ADMIN_API_KEYS]
        self.enabled = bool(self.plain or self.admin)
        self.public_docs = config.PUBLIC_DOCS

    @staticmethod
    def _match(token: bytes, keys: list[bytes]) -> bool:
        found = False
        for key in keys:  # no early exit: the time does not depend on which key matched
            found |= hmac.compare_digest(token, key)
        return found

    def check(self, token: str) -> tuple[bool, bool]:
        """(valid, admin) for a presented key."""
        raw = _digest(token)
        admin = self._match(raw, self.admin)
        return admin or self._match(raw, self.plain), admin


def _digest(key: str) -> bytes:
    """Keys are compared as SHA-256 digests: equal lengths, so the comparison
    time does not even reveal a key's length."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def read_key_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped. A
    missing file stops the server: starting without the keys would leave it open."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line.strip() for line in fh]
    except OSError as exc:
        raise RuntimeError(f"LLMHOST_API_KEYS_FILE={path!r} cannot be read: {exc.strerror}") from exc
    return [line for line in lines if line and not line.startswith("#")]


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _needs_key(path: str, keys: Keys) -> bool:
    if path == "/v1" or path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
        return True
    return not keys.public_docs and path.startswith(DOCS_PATHS)


def _check() -> None:
    keys: Keys = current_app.extensions["llmhost_keys"]
    if not keys.enabled or request.method == "OPTIONS" or not _needs_key(request.path, keys):
        return
    challenge = {"WWW-Authenticate": 'Bearer realm="llmhost"'}
    token = _bearer()
    if token is None:
        raise APIError(401, "You didn't provide an API key. Send it in an Authorization header "
                            "using Bearer auth (Authorization: Bearer YOUR_KEY).",
                       code="missing_api_key", headers=challenge)
    valid, admin = keys.check(token)
    if not valid:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                       headers={"WWW-Authenticate": 'Bearer realm="llmhost", error="invalid_token"'})
    request.environ[ENVIRON_ADMIN] = admin or not keys.admin
    if _is_admin_route() and not can_manage_models():
        raise APIError(403, "Loading and unloading models needs an admin key "
                            "(LLMHOST_ADMIN_API_KEYS); this key can list models and run inference.",
                       code="admin_key_required")


def _is_admin_route() -> bool:
    """Loading and unloading: POST /v1/models and DELETE /v1/models/{id}. Matched
    on method and path, not view names, so a renamed view cannot drop the check."""
    path = request.path.rstrip("/")
    return ((request.method == "POST" and path == "/v1/models")
            or (request.method == "DELETE" and path.startswith("/v1/models/")))


def can_manage_models() -> bool:
    """Whether the current caller may load and unload models (and so autoload).
    Outside a request (preload, the reaper) the server itself is acting."""
    if not has_request_context():
        return True
    return request.environ.get(ENVIRON_ADMIN, True)


def may_see_paths() -> bool:
    """Admins (and everyone on a keyless server) see server paths; on open routes
    (/ready, /metrics) the key, if sent, is checked here."""
    keys = current_app.extensions.get("llmhost_keys")
    if keys is None or not keys.enabled:
        return True
    if ENVIRON_ADMIN in request.environ:           # a /v1 route: the key was checked
        return bool(request.environ[ENVIRON_ADMIN])
    token = _bearer()
    if token is None:
        return False
    valid, admin = keys.check(token)
    return valid and (admin or not keys.admin)


def _init_spec(api) -> None:
    api.spec.components.security_scheme("bearerAuth", {
        "type": "http", "scheme": "bearer",
        "description": "An API key from LLMHOST_API_KEYS (or LLMHOST_ADMIN_API_KEYS to load "
                       "and unload models). Not needed when the server sets no keys."})
    api.spec.options["security"] = [{"bearerAuth": []}]


def init_app(app: Flask, api, config) -> None:
    """After the Api is built (the spec exists) and before the blueprints' routes run."""
    keys = Keys(config)
    app.extensions["llmhost_keys"] = keys
    if keys.enabled:
        log.info("API keys required on /v1 (%d keys, %d admin keys)",
                 len(keys.plain) + len(keys.admin), len(keys.admin))
    app.before_request(_check)
    _init_spec(api)


def caller() -> tuple[str | None, bool]:
    """(owner, sees_all) for data a request stores, such as stored responses:
    owner is the SHA-256 (hex) of the caller's key, never the key itself; an
    admin key (LLMHOST_ADMIN_API_KEYS), or a server without keys, sees all."""
    keys: Keys = current_app.extensions["llmhost_keys"]
    token = _bearer() if has_request_context() else None
    if not keys.enabled or token is None:
        return None, True
    _, admin = keys.check(token)
    return _digest(token).hex(), admin


def prefix_partition(salt: str | None, per_key: bool) -> str:
    """The prefix cache partition of a request (engine/prefixcache.py): its
    `cache_salt` and, with LLMHOST_PREFIX_CACHE_PER_KEY, its API key, hashed so
    that neither is kept in the cache."""
    key = _bearer() if per_key and has_request_context() else None
    if not salt and not key:
        return ""
    return hashlib.sha256(f"{salt or ''}\0{key or ''}".encode()).hexdigest()


redact.watch_viewer(may_see_paths)
