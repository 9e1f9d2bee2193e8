"""Settings, read once from ``LLMHOST_*`` environment variables.

Every variable is listed in docs/configuration.md (tests/test_docs.py checks it); defaults are safe for a single
machine (loopback only, no keys, downloads allowed).
"""
from __future__ import annotations

import os
from typing import Mapping

from flask import current_app


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _aliases(value: str) -> dict[str, str]:
    """``alias=model id,alias=model id`` (LLMHOST_MODEL_ALIASES)."""
    out = {}
    for item in _list(value):
        alias, sep, target = item.partition("=")
        if not sep or not alias.strip() or not target.strip():
            raise ValueError(f"LLMHOST_MODEL_ALIASES: {item!r} is not alias=model")
        out[alias.strip()] = target.strip()
    return out


def _int4_kernel(value: str) -> str:
    """auto or torch (LLMHOST_INT4_KERNEL; models/loading.py int4_kernel)."""
    value = value.strip().lower()
    if value not in ("auto", "torch"):
        raise ValueError(f"LLMHOST_INT4_KERNEL is 'auto' or 'torch', not {value!r}")
    return value


class Config:
    """Typed view of the environment; Flask reads the upper-case attributes."""

    # (attribute and LLMHOST_ env var suffix, parser, default)
    SETTINGS = (
        ("HOST", str, "127.0.0.1"),
        ("PORT", int, 8000),
        ("THREADS", int, 128),
        ("WORKER_TIMEOUT", int, 0),
        ("LOG_LEVEL", str, "info"),
        ("LOG_FORMAT", str, "text"),
        ("LOG_CONTENT", _bool, False),
        ("ACCESS_LOG", str, ""),
        ("ERROR_LOG", str, "-"),
        ("ALLOW_REMOTE_CODE", _bool, False),
        ("ALLOW_DOWNLOADS", _bool, True),
        ("HUB_TIMEOUT", float, 5.0),
        ("MODEL_DIRS", _list, []),
        ("MODELS", str, ""),
        ("MODEL_ALIASES", _aliases, {}),  # gpt-4o=smollm2,...: names that reach a loaded model
        ("MAX_LOADED_MODELS", int, 0),
        ("KEEP_ALIVE", float, 0.0),
        ("AUTOLOAD", _bool, False),
        ("DEFAULT_MAX_TOKENS", int, 512),
        ("DEFAULT_TEMPERATURE", float, 0.7),
        ("DEFAULT_TOP_P", float, 0.9),
        ("MAX_N", int, 8),
        ("MAX_MESSAGES", int, 1024),
        ("MAX_TOOL_CALLS", int, 32),     # per choice; 0: no limit (generation/callguard.py)
        ("MAX_GRAMMAR_BYTES", int, 64 * 1024),
        ("MAX_GRAMMAR_NODES", int, 1024),      # subschemas + enum values per schema (docs/hardening.md)
        ("MAX_GRAMMAR_OPTIONAL", int, 128),    # optional properties per schema (compile time ~ n^2)
        ("MAX_TOOLS_BYTES", int, 256 * 1024),  # all of `tools` (or `functions`) as JSON
        ("MAX_PROMPT_TOKENS", int, 0),
        ("MAX_QUEUE", int, 64),
        ("QUEUE_TIMEOUT", float, 600.0),
        ("MAX_BATCH", int, 32),
        ("BATCH_WAIT_MS", float, 25.0),
        ("INT4_KERNEL", _int4_kernel, "auto"),    # auto: llmhost's AVX2 kernel where it runs; torch (models/q4kernel.py)
        ("CPU_FLAGS", str, ""),          # "": the CPU's; else only these (engine/native.py cpu_flags)
        ("LONE_ROW_THREADS", int, 0),    # a lone row's threads; 0: all (engine/scheduler.py step_threads)
        ("IMAGE_URLS", _bool, False),    # fetch http(s) image_url parts (generation/images.py)
        ("MAX_IMAGES", int, 8),          # image parts per request
        ("MAX_IMAGE_PIXELS", int, 16_000_000),   # width x height of one image
        ("MAX_IMAGE_BYTES", int, 10 * 1024 * 1024),   # one image, encoded (data URL or fetched)
        ("IMAGE_FETCH_TIMEOUT", float, 10.0),         # seconds for one http(s) image
        # per model; 0 (the default): off, since reuse can move reduced-precision
        # logits in their last digits (docs/prefix-caching.md); engine/prefixcache.py
        ("PREFIX_CACHE_MB", float, 512.0),
        ("PREFILL_CHUNK", int, 128),     # tokens per prefill forward of a long prompt (engine/scheduler.py)
        ("PREFIX_CACHE_PER_KEY", _bool, False),  # partition the prefix cache by API key
        ("EMBED_BATCH", int, 32),
        ("MAX_EMBED_INPUTS", int, 2048),
        ("EMBED_TOKEN_IDS", str, "cl100k_base"),
        ("MAX_RERANK_DOCUMENTS", int, 1000),   # documents (or text_2 items) per rerank/score request
        ("MAX_RERANK_TOKENS", int, 500_000),   # tokens of all pairs of one rerank/score request
        ("MAX_AUDIO_BYTES", int, 25 * 1024 * 1024),  # an uploaded audio file (OpenAI's limit)
        ("MAX_AUDIO_SECONDS", float, 3600.0),  # decoded audio per transcription
        ("MAX_BODY_BYTES", int, 8 * 1024 * 1024),
        ("READ_TIMEOUT", float, 20.0),
        ("RESTORE_MODELS", str, "crash"),
        ("MEMORY_HEADROOM", float, 0.2),
        ("MEMORY_LIMIT", int, 0),
        ("API_KEYS", _list, []),
        ("API_KEYS_FILE", str, ""),
        ("ADMIN_API_KEYS", _list, []),
        ("API_KEY_NAMES", str, "auto"),   # name:key entries: on, off (literal keys), auto (refuse)
        # Limits for keys with no entry in a TOML keys file (0: none); http/metering.py
        ("RATE_LIMIT_RPM", int, 0),
        ("RATE_LIMIT_TPM", int, 0),
        ("TOKEN_QUOTA_DAY", int, 0),
        ("TOKEN_QUOTA_MONTH", int, 0),
        ("USAGE", _bool, True),          # per-key usage accounting in the store (store/usage.py)
        ("USAGE_FLUSH_S", float, 5.0),   # how often counted usage is written, batched
        ("PUBLIC_DOCS", _bool, True),
        ("CORS_ORIGINS", _list, []),
        ("STATE_DIR", str, ""),          # "": platformdirs' user data dir for llmhost
        ("CACHE_DIR", str, ""),          # "": STATE_DIR/cache; "off": none (cache_dir below)
        ("DATABASE_URL", str, ""),       # "": sqlite file llmhost.db in STATE_DIR
        ("RESPONSES_TTL", float, 0.0),   # seconds a stored response is kept; 0: forever
        ("RESPONSES_LEASE", float, 60.0),  # s: an in_progress response whose server is gone reads failed after
        ("MAX_STORED_INPUT_BYTES", int, 4 * 1024 * 1024),  # a stored conversation's input (JSON bytes)
        ("DB_POOL_SIZE", int, 5),        # connections each replica keeps to PostgreSQL
        ("DB_MAX_OVERFLOW", int, 10),    # extra connections under load (replicas x both <= max_connections)
        ("DB_POOL_TIMEOUT", float, 30.0),  # s to wait for a free connection
        ("SERVER_ID", str, ""),          # "": host name + the address gunicorn binds (journal, leases)
        # The `llmhost` client commands (models, load, unload, chat): where and how to call.
        ("URL", str, "http://127.0.0.1:8000"),
        ("API_KEY", str, ""),
    )

    TESTING = False
    API_TITLE = "llmhost"
    API_VERSION = "v1"
    OPENAPI_VERSION = "3.0.3"
    OPENAPI_URL_PREFIX = "/"
    OPENAPI_JSON_PATH = "openapi.json"
    OPENAPI_SWAGGER_UI_PATH = "/docs"
    # Served by llmhost itself (llmhost/http/pages.py), so the docs work offline.
    OPENAPI_SWAGGER_UI_URL = "/assets/swagger-ui/"
    OPENAPI_REDOC_PATH = "/redoc"
    OPENAPI_REDOC_URL = "/assets/redoc/redoc.standalone.js"

    def __init__(self, environ: Mapping[str, str] | None = None, **overrides):
        env = os.environ if environ is None else environ
        for name, parse, default in self.SETTINGS:
            raw = env.get("LLMHOST_" + name)
            value = default if raw is None or raw == "" else parse(raw)
            setattr(self, name, value)
        for name, value in overrides.items():
            setattr(self, name, value)
        self.MAX_CONTENT_LENGTH = self.MAX_BODY_BYTES


def state_dir(config) -> str:
    """LLMHOST_STATE_DIR, else the per-user data folder each OS expects
    (platformdirs: ~/.local/share/llmhost on Linux), rather than guessing paths."""
    if config.STATE_DIR:
        return os.path.abspath(os.path.expanduser(config.STATE_DIR))
    import platformdirs
    return platformdirs.user_data_dir("llmhost", appauthor=False)


def cache_dir(config=None) -> str:
    """Where what a process builds or reads once is kept for the next one
    (engine/native.py's compiled kernels, models/gguf.py's GGUF headers):
    LLMHOST_CACHE_DIR, else the folder cache in the state folder; "" with
    LLMHOST_CACHE_DIR=off. Without `config`, the environment's: those callers
    keep one copy per process, whichever app asks."""
    config = config or Config()
    if config.CACHE_DIR.strip().lower() == "off":
        return ""
    return os.path.abspath(os.path.expanduser(config.CACHE_DIR)) if config.CACHE_DIR else \
        os.path.join(state_dir(config), "cache")


def server_id(config: Config) -> str:
    """This server's name among replicas sharing a state folder or a database:
    LLMHOST_SERVER_ID, which the gunicorn worker sets to the host name and the
    addresses it really binds (llmhost/server/gworker.py) unless given."""
    import socket
    return config.SERVER_ID or f"{socket.gethostname()}@http://{config.HOST}:{config.PORT}"


def settings() -> Config:
    """The Config of the app handling the current request (or app context): the
    one way code reads settings, so two apps in one process never share them."""
    return current_app.config["LLMHOST"]


class TestConfig(Config):
    """Config for the Flask test client: testing mode, nothing preloaded."""

    TESTING = True
    __test__ = False  # not a pytest test class

    def __init__(self, environ: Mapping[str, str] | None = None, **overrides):
        overrides.setdefault("MODELS", "")
        super().__init__(environ, **overrides)
