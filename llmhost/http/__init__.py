"""App plumbing between the WSGI server and the routes: the Api/Blueprint/Schema
subclasses (extensions), the one error path (errors), keys (auth), CORS, the
body limit (limits), cheap request checks (checks), request ids and logs
(observability), path redaction (redact), SSE framing (sse) and the pages
(pages: /, /docs, /redoc).

May import: config, engine (its domain errors and metrics). Never api/."""
