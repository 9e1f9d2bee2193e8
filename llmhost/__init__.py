"""llmhost: a self-hosted, OpenAI-compatible server for Hugging Face models."""
from __future__ import annotations

import os

from flask import Flask

from .config import Config
from .version import __version__  # noqa: F401  (llmhost.__version__)

# transformers 5 "kernelizes" every model it loads on CUDA with layers fetched from the Hub
# (kernels-community/rotary, .../activation, ...) unless told not to. With llmhost's
# local_files_only loads and on an offline server that fails every CUDA load ("Version 2 of
# 'kernels-community/rotary' is not available in the local cache"), and online it runs code
# the operator never chose. Off, unless the operator sets USE_HUB_KERNELS themselves; set
# at import so the server, `llmhost` commands and in-process references load alike.
os.environ.setdefault("USE_HUB_KERNELS", "0")


def create_app(config: Config | None = None) -> Flask:
    """Config -> extensions -> collaborators -> blueprints. Only wsgi.py (and
    tests) call this."""
    from . import api as api_modules
    from .engine import metrics, omp
    from .http import auth, cors, limits, metering, observability, pages, redact
    from .store import responses
    from .http.extensions import Api
    from .models.registry import registry
    from .server import preload

    config = config or Config()
    app = Flask(__name__)
    app.config.from_object(config)
    app.config["LLMHOST"] = config  # read through config.settings()
    app.json.sort_keys = False
    observability.init_app(app, config)  # logging, request ids, request log
    limits.init_app(app)  # LLMHOST_MAX_BODY_BYTES, before anything reads the body

    # One Api per app: it holds this app's OpenAPI spec (bemserver-api builds it here too).
    api = Api(app)
    auth.init_app(app, api, config)  # keys, security scheme (needs api's spec)
    metering.init_app(app)  # usage and limits per key (after auth: it names the caller)
    cors.init_app(app, config.CORS_ORIGINS)
    # Collaborators, wired here rather than by importing a module: who may see
    # server paths and which paths to hide; the per-model gauges of /metrics.
    redact.init_app(app, viewer=auth.may_see_paths, sources=(registry.server_paths,))
    metrics.watch_models(registry.list)
    for module in api_modules.MODULES:
        api.register_blueprint(module.blp)
    pages.init_app(app)  # the chat page at / and the docs' own assets (no CDN)
    # A request thread that ran torch's parallel work (a load, an image's
    # preprocessing) hands its OpenMP workers back: kept, they slow every
    # decode step of the model threads (engine/omp.py).
    app.teardown_request(lambda exc: omp.release())
    preload.start(app, config)  # LLMHOST_MODELS, in a background thread of this (worker) process
    responses.fail_abandoned_at_start(app, config)  # what this server left in_progress
    return app
