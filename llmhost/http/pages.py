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

Every HTML page carries a Content-Security-Policy that keeps the browser on
this server: ReDoc's footer logo (an <img> from cdn.redoc.ly hard-coded in
redoc.standalone.js) is not fetched, and an injected script from elsewhere
would not run. What the pages need and nothing more: Swagger UI's one inline
<script> (allowed by its SHA-256, computed from the page as served), inline
styles (Swagger UI and ReDoc set them from JavaScript), data: images and fonts,
and blob: workers (ReDoc's search).
"""
from __future__ import annotations

import base64
import hashlib
import os
import re

from flask import Blueprint, Flask, Response, abort, send_from_directory

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


CSP = ("default-src 'self'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
       "worker-src 'self' blob:; object-src 'none'; base-uri 'self'; form-action 'self'; "
       "frame-ancestors 'self'")
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def content_security_policy(response: Response) -> Response:
    """The policy on every HTML page, with the hashes of its inline scripts."""
    if response.mimetype != "text/html" or "Content-Security-Policy" in response.headers:
        return response
    hashes = ""
    if not response.direct_passthrough:     # a rendered page (the docs), not a file
        hashes = "".join(
            " 'sha256-" + base64.b64encode(hashlib.sha256(script).digest()).decode() + "'"
            for script in _INLINE_SCRIPT.findall(response.get_data()))
    response.headers["Content-Security-Policy"] = CSP.format(hashes=hashes)
    return response


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    app.after_request(content_security_policy)
