"""gunicorn settings for llmhost; every value can be overridden by LLMHOST_* env vars
(or gunicorn's own command-line flags).

They live in the package (this file is `llmhost/server/gunicorn_conf.py`) so that an
installed llmhost has them too: `llmhost serve` runs gunicorn with
`-c python:llmhost.server.gunicorn_conf`, and the checkout's gunicorn.conf.py imports them.

One worker process with many threads: loaded models live in that process and
every request shares them. Models are never loaded in the master (the app is not
preloaded; LLMHOST_MODELS is loaded inside the worker), because CUDA state does
not survive fork.
"""
import os

from llmhost.config import Config

_config = Config()

bind = f"{_config.HOST}:{_config.PORT}"
workers = 1
# gthread, with requests read by the event loop rather than by the threads, so
# slow clients cannot hold every thread (llmhost/server/gworker.py, LLMHOST_READ_TIMEOUT).
worker_class = "llmhost.server.gworker.GuardedThreadWorker"
threads = _config.THREADS
preload_app = False  # keep: LLMHOST_MODELS must load in the worker (llmhost/server/preload.py), not the master
# gthread's heartbeat comes from the worker's main loop, not from request threads,
# so a long generation or a slow model load never trips it. 0 disables it.
timeout = _config.WORKER_TIMEOUT
graceful_timeout = 30
# gunicorn >= 25.1 opens a control socket at one path per user
# ($XDG_RUNTIME_DIR/gunicorn.ctl or ~/.gunicorn/gunicorn.ctl), shared by every
# gunicorn that user runs: replicas on one machine would take it from each other.
# llmhost is managed through its API and signals, so it is off.
control_socket_disable = True
keepalive = 5
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None

# Logs. llmhost itself writes one line per request (request id, model, tokens,
# latency) to stderr, so gunicorn's access log is off unless LLMHOST_ACCESS_LOG
# names a file or "-" (stdout). gunicorn's error log (start-up, worker boots and
# crashes) goes to LLMHOST_ERROR_LOG, stderr by default. Neither logs headers,
# so API keys never reach a log.
loglevel = _config.LOG_LEVEL
accesslog = _config.ACCESS_LOG or None
errorlog = _config.ERROR_LOG or "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms rid=%({x-request-id}o)s'
if _config.LOG_FORMAT == "json":  # gunicorn's own lines as JSON too
    logger_class = "llmhost.http.observability.GunicornLogger"


def post_worker_init(worker) -> None:
    """The worker has imported the app (torch among it): hand back the code
    pages only start-up ran (models/reclaim.py, release_code_pages), so an
    idle worker's RSS counts what it uses."""
    from llmhost.models.reclaim import release_code_pages
    release_code_pages()
