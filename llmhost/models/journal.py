"""A small journal of the models loaded through the API, so that a crashed
worker (OOM-killed, segfault, kill -9) comes back with the models clients were
using instead of answering 404 for them (issue 9, section 7).

One JSON file per server in LLMHOST_STATE_DIR, named after config.server_id
(the host name and the address gunicorn really binds, or LLMHOST_SERVER_ID), so
servers sharing the folder never share a journal (default
``$XDG_DATA_HOME/llmhost``, else ``~/.local/share/llmhost``): the load options
of each API load, in order, and the pid of the gunicorn master that wrote it.
A worker starting under the same master is a restarted worker: it loads the
journal's models in the background like LLMHOST_MODELS (``/ready`` lists them
under `loading`). A new master (a full restart) restores them only with
LLMHOST_RESTORE_MODELS=always; by default (`crash`) it starts from
LLMHOST_MODELS alone and clears the journal; `never` turns the journal off.
Unloading (DELETE, keep_alive, eviction) removes the model from the journal."""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading

from ..config import server_id, state_dir

log = logging.getLogger("llmhost")

_lock = threading.Lock()
_path: str | None = None          # set by init() in a server process; None: journal off


def _read() -> dict:
    try:
        with open(_path) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) and isinstance(data.get("models"), list) else {}
    except (OSError, ValueError):
        return {}


def _write(data: dict) -> None:
    folder = os.path.dirname(_path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".journal-")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, _path)     # atomic: a crash mid-write leaves the old journal


def init(config) -> list[dict]:
    """Turn the journal on for this worker; the load options to restore now."""
    global _path
    mode = getattr(config, "RESTORE_MODELS", "crash")
    if mode == "never" or getattr(config, "TESTING", False):
        return []
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", server_id(config))
    _path = os.path.join(state_dir(config), f"models-{name}.json")
    master = os.getppid()
    with _lock:
        data = _read()
        restore = data.get("models", []) if (data.get("master") == master or mode == "always") else []
        try:
            _write({"master": master, "models": restore})
        except OSError as exc:
            log.warning("model journal disabled: cannot write %s (%s)", _path, exc)
            _path = None
            return []
    if restore:
        log.info("restoring %d models loaded through the API before the worker restarted: %s",
                 len(restore), ", ".join(str(m.get("id") or m.get("model")) for m in restore))
    return [dict(m) for m in restore]


def record(options: dict, model_id: str) -> None:
    """A model loaded through the API now."""
    if _path is None:
        return
    entry = {key: value for key, value in options.items() if value is not None}
    entry["id"] = model_id
    with _lock:
        data = _read() or {"master": os.getppid(), "models": []}
        data["models"] = [m for m in data["models"] if m.get("id") != model_id] + [entry]
        try:
            _write(data)
        except OSError as exc:
            log.warning("could not write the model journal %s: %s", _path, exc)


def forget(model_id: str) -> None:
    if _path is None:
        return
    with _lock:
        data = _read()
        models = [m for m in data.get("models", []) if m.get("id") != model_id]
        if data and len(models) != len(data["models"]):
            data["models"] = models
            try:
                _write(data)
            except OSError as exc:
                log.warning("could not write the model journal %s: %s", _path, exc)
