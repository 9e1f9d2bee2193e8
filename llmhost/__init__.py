"""llmhost: a self-hosted, OpenAI-compatible server for Hugging Face models."""
from __future__ import annotations

from flask import Flask

from .config import Config

__version__ = "0.1.0"


def create_app(config: Config | None = None) -> Flask:
    """Config -> extensions -> blueprints. Only wsgi.py (and tests) call this."""
    from . import api as api_modules
    from . import auth, observability, preload, web
    from .extensions import api
    from .registry import registry

    config = config or Config()
    app = Flask(__name__)
    app.config.from_object(config)
    app.config["LLMHOST"] = config
    app.json.sort_keys = False
    observability.init_app(app)  # logging, request ids, request log, body limit

    api.init_app(app)
    auth.init_app(app)  # keys, CORS, security scheme (needs api's spec)
    registry.init_app(app)
    for module in api_modules.MODULES:
        api.register_blueprint(module.blp)
    web.init_app(app)  # the chat page at / and the docs' own assets (no CDN)
    preload.start(app)  # LLMHOST_MODELS, in a background thread of this (worker) process
    return app
