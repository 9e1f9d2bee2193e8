"""gunicorn settings for llmhost; every value can be overridden by LLMHOST_* env vars
(or gunicorn's own command-line flags).

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
worker_class = "gthread"
threads = _config.THREADS
preload_app = False
# gthread's heartbeat comes from the worker's main loop, not from request threads,
# so a long generation or a slow model load never trips it. 0 disables it.
timeout = _config.WORKER_TIMEOUT
graceful_timeout = 30
keepalive = 5
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
loglevel = _config.LOG_LEVEL
accesslog = os.environ.get("LLMHOST_ACCESS_LOG", "-")
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms rid=%({x-request-id}o)s'
