"""Running llmhost: the `llmhost` command (cli), gunicorn settings
(gunicorn_conf) and worker (gworker), a child server for tests and the
benchmark (process), and the start-up loads of LLMHOST_MODELS (preload: the
only module here create_app uses, started in the worker)."""
