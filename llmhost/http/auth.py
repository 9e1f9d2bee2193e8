"""API keys (``Authorization: Bearer KEY``, or ``x-api-key: KEY`` as
Anthropic's clients send it), admin scope, and the security scheme in the
OpenAPI document.

Without keys configured everything is open (the default binds to loopback only).
Once any key is set, every /v1 route (and Ollama's /api routes) needs one; probes and metrics stay open so
load balancers and Prometheus need no secret. Keys are compared in constant
time against every configured key, so timing says nothing about which key (or
how much of one) matched, and a key is never logged or echoed.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

from flask import Flask, current_app, has_request_context, request

from .errors import APIError

log = logging.getLogger("llmhost")

DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")
ENVIRON_ADMIN = "llmhost.admin"


@dataclass(frozen=True)
class Identity:
    """Who a key is, for usage and limits: its digest (never the key), the name
    given to it in the keys file or as `name:key`, and the group whose limits
    it shares."""

    digest: str | None            # hex SHA-256 of the key; None on a keyless server
    name: str | None = None
    group: str | None = None

    @property
    def label(self) -> str:
        """What reports show: the name, else a short digest prefix, never the key."""
        if self.name:
            return self.name
        return f"sha256:{self.digest[:12]}" if self.digest else "anonymous"


class Keys:
    def __init__(self, config) -> None:
        named = config.API_KEY_NAMES
        entries = _entries(config.API_KEYS, "LLMHOST_API_KEYS", named)
        admin = _entries(config.ADMIN_API_KEYS, "LLMHOST_ADMIN_API_KEYS", named)
        self.limits: dict = {}           # keys file (TOML): defaults, groups, per-key limits
        if config.API_KEYS_FILE:
            if config.API_KEYS_FILE.endswith(".toml"):
                toml_keys, toml_admin, self.limits = read_toml_keys(config.API_KEYS_FILE)
                entries += toml_keys
                admin += toml_admin
            else:
                entries += _entries(read_key_file(config.API_KEYS_FILE),
                                    "LLMHOST_API_KEYS_FILE", named)
        self.plain = [d for d, _ in entries]
        self.admin = [d for d, _ in admin]
        # digest -> Identity, for keys that have a name or a group
        self.identities = {d: ident for d, ident in entries + admin if ident is not None}
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

    def identity(self, token: str | None) -> Identity:
        if token is None or not self.enabled:
            return Identity(None)
        digest = _digest(token)
        return self.identities.get(digest) or Identity(digest.hex())


def _entries(keys: list[str], source: str, named: str) -> list[tuple[bytes, "Identity | None"]]:
    """(digest, identity) per configured key. `name:key` entries are read as
    named keys only when LLMHOST_API_KEY_NAMES=on: a key that happens to hold a
    colon was a literal key before names existed, and must not silently change
    meaning, so with the default (auto) such an entry stops the server with a
    message saying how to choose."""
    out = []
    for index, key in enumerate(keys):
        if ":" in key and named == "auto":
            raise RuntimeError(
                f"{source} entry {index + 1} contains ':'. Set LLMHOST_API_KEY_NAMES=on to read "
                "entries as name:key (the name shows in usage reports), or off to keep them "
                "literal keys.")
        if ":" in key and named == "on":
            name, _, secret = key.partition(":")
            if not name or not secret:
                raise RuntimeError(f"{source} entry {index + 1}: write name:key, both non-empty.")
            digest = _digest(secret)
            out.append((digest, Identity(digest.hex(), name=name)))
        else:
            out.append((_digest(key), None))
    return out


def read_toml_keys(path: str) -> tuple[list, list, dict]:
    """A keys file in TOML (tomllib, in Python's standard library since 3.11;
    the `tomli` backport before): named keys with their group, admin flag and
    limits, groups of keys that share limits, and defaults for every other key.

        [defaults]
        requests_per_minute = 600
        [groups.interns]
        tokens_per_minute = 20000
        tokens_per_day = 500000
        [keys.alice]
        key = "sk-..."            # or sha256 = "<hex digest of the key>"
        group = "interns"
        [keys.ops]
        sha256 = "..."
        admin = true
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise RuntimeError(f"LLMHOST_API_KEYS_FILE={path!r} cannot be read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RuntimeError(f"LLMHOST_API_KEYS_FILE={path!r} is not valid TOML: {exc}") from exc
    groups = data.get("groups") or {}
    plain, admin, limits = [], [], {"defaults": _limits(data.get("defaults") or {}, "defaults"),
                                     "groups": {}, "keys": {}}
    for group, spec in groups.items():
        limits["groups"][group] = _limits(spec, f"groups.{group}")
    for name, spec in (data.get("keys") or {}).items():
        where = f"keys.{name}"
        if bool(spec.get("key")) == bool(spec.get("sha256")):
            raise RuntimeError(f"LLMHOST_API_KEYS_FILE: [{where}] needs exactly one of key, sha256.")
        digest = (_digest(spec["key"]) if spec.get("key")
                  else bytes.fromhex(str(spec["sha256"]).strip()))
        group = spec.get("group")
        if group is not None and group not in groups:
            raise RuntimeError(f"LLMHOST_API_KEYS_FILE: [{where}] names group {group!r}, which "
                               "has no [groups.NAME] table.")
        limits["keys"][name] = _limits(spec, where, extra=("key", "sha256", "group", "admin"))
        entry = (digest, Identity(digest.hex(), name=name, group=group))
        (admin if spec.get("admin") else plain).append(entry)
    return plain, admin, limits


LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month")


def _limits(spec: dict, where: str, extra: tuple = ()) -> dict:
    unknown = set(spec) - set(LIMIT_FIELDS) - set(extra)
    if unknown:
        raise RuntimeError(f"LLMHOST_API_KEYS_FILE: [{where}] has unknown fields "
                           f"{sorted(unknown)}; use {', '.join(LIMIT_FIELDS)}.")
    out = {}
    for name in LIMIT_FIELDS:
        if name in spec:
            value = spec[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RuntimeError(f"LLMHOST_API_KEYS_FILE: [{where}] {name} must be a whole "
                                   "number >= 0 (0: no limit).")
            out[name] = value
    return out


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
    """The presented key: a bearer token, else Anthropic's `x-api-key` header."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return request.headers.get("x-api-key", "").strip() or None
    return token.strip()


def _needs_key(path: str, keys: Keys) -> bool:
    if path == "/v1" or path.startswith(("/v1/", "/api/")) or path in (
            "/tokenize", "/detokenize", "/rerank", "/v2/rerank"):
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
                            "using Bearer auth (Authorization: Bearer YOUR_KEY), or as "
                            "x-api-key: YOUR_KEY.",
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
    """Loading and unloading: POST /v1/models and DELETE /v1/models/{id}, and
    Ollama's /api/pull and /api/delete. Matched on method and path, not view
    names, so a renamed view cannot drop the check."""
    path = request.path.rstrip("/")
    return ((request.method == "POST" and path in ("/v1/models", "/api/pull"))
            or (request.method == "DELETE" and (path.startswith("/v1/models/")
                                                or path == "/api/delete")))


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



def identity() -> Identity:
    """The current caller as usage and limits see it."""
    keys: Keys = current_app.extensions["llmhost_keys"]
    return keys.identity(_bearer() if has_request_context() else None)


def prefix_partition(salt: str | None, per_key: bool) -> str:
    """The prefix cache partition of a request (engine/prefixcache.py): its
    `cache_salt` and, with LLMHOST_PREFIX_CACHE_PER_KEY, its API key, hashed so
    that neither is kept in the cache."""
    key = _bearer() if per_key and has_request_context() else None
    if not salt and not key:
        return ""
    return hashlib.sha256(f"{salt or ''}\0{key or ''}".encode()).hexdigest()

