"""Pages for people: the chat page at ``/`` and the assets of the API docs.

Swagger UI (``/docs``) and ReDoc (``/redoc``) are flask-smorest's pages; their
JavaScript and CSS come from here, not from a CDN, so the docs work on a machine
without internet. The files are those of the PyPI package ``openapi-ui-bundles``
(pinned in setup.cfg): one package, no dependencies, shipping both Swagger UI
(5.17) and ReDoc's ``redoc.standalone.js`` (2.x). We picked it over
``swagger-ui-bundle`` (Swagger UI 4.15 only, no ReDoc) and the
``flask-openapi-swagger`` / ``flask-openapi-redoc`` pair (newer releases, but they
pull in the whole flask-openapi framework and pydantic for two static files).

The chat page is plain HTML, CSS and JavaScript in ``llmhost/static`` (no build
step), served by Flask's own static route; it talks to ``/v1`` like any client.
"""
from __future__ import annotations

import os

from flask import Blueprint, Flask, abort, send_from_directory

ASSETS_URL = "/assets"
SWAGGER_UI_URL = ASSETS_URL + "/swagger-ui/"
REDOC_URL = ASSETS_URL + "/redoc/redoc.standalone.js"
STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")

bp = Blueprint("web", __name__)


def _bundle_dir(name: str) -> str | None:
    try:
        import openapi_ui_bundles
    except ImportError:  # the docs pages then say why in the browser console (404s)
        return None
    return str(getattr(openapi_ui_bundles, name).static_path)


@bp.get("/")
def chat_page():
    """The playground: plain HTML, no build step."""
    return send_from_directory(STATIC, "index.html", max_age=0)


@bp.get(ASSETS_URL + "/<any('swagger-ui', 'redoc'):bundle>/<path:filename>")
def docs_asset(bundle: str, filename: str):
    folder = _bundle_dir("swagger_ui" if bundle == "swagger-ui" else "redoc")
    if folder is None:
        abort(404)
    return send_from_directory(folder, filename, max_age=86400)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
