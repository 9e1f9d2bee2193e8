"""gunicorn settings for `gunicorn wsgi:app` in this checkout: the package's own
(llmhost/server/gunicorn_conf.py, also used by `llmhost serve`), every value overridable by
LLMHOST_* env vars or gunicorn's command-line flags."""
from llmhost.server.gunicorn_conf import *  # noqa: F401,F403
