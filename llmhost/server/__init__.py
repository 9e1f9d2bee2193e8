"""Running llmhost: the `llmhost` command (cli), gunicorn settings
(gunicorn_conf) and worker (gworker), and a child server for tests and the
benchmark (process). Nothing here is imported by the app itself."""
