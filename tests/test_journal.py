"""A crashed worker loses nothing silently (issue 9, section 7): models loaded
through the API are reloaded by the worker gunicorn starts after a kill -9,
/ready lists them as loading meanwhile, and unloaded ones stay unloaded."""
import os
import signal
import time

import pytest
import requests

from support import Server


def wait_for_new_worker(srv, old_pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = srv.worker_pid()
            if pid != old_pid and requests.get(srv.url + "/health", timeout=2).status_code == 200:
                return pid
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError("gunicorn did not start a new worker")


def wait_ready(srv, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = requests.get(srv.url + "/ready", timeout=5)
        body = r.json()
        if r.status_code == 200:
            return body
        time.sleep(0.05)
    raise AssertionError(f"never ready: {body}")


@pytest.mark.slow  # starts its own server
def test_api_loaded_models_survive_a_worker_crash(tiny_models, tmp_path):
    srv = Server(env={"LLMHOST_STATE_DIR": str(tmp_path)}).start()
    try:
        srv.load(tiny_models["llama"], id="j-llama")
        srv.load(tiny_models["gpt2"], id="j-gpt2")
        assert requests.delete(srv.url + "/v1/models/j-gpt2", timeout=60).status_code == 200
        body = {"model": "j-llama", "prompt": "hello", "max_tokens": 6, "temperature": 0}
        before = requests.post(srv.url + "/v1/completions", json=body, timeout=60).json()

        pid = srv.worker_pid()
        os.kill(pid, signal.SIGKILL)
        wait_for_new_worker(srv, pid)
        ready = wait_ready(srv)
        assert ready["loaded"] == ["j-llama"], ready      # the unloaded one stays unloaded
        after = requests.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert after.status_code == 200, after.text
        assert after.json()["choices"][0]["text"] == before["choices"][0]["text"]

        # unloaded after the restart: a second crash does not bring it back
        assert requests.delete(srv.url + "/v1/models/j-llama", timeout=60).status_code == 200
        pid = srv.worker_pid()
        os.kill(pid, signal.SIGKILL)
        wait_for_new_worker(srv, pid)
        assert wait_ready(srv)["loaded"] == []
    finally:
        srv.stop()


@pytest.mark.slow  # starts its own servers
def test_full_restart_restores_only_when_asked(tiny_models, tmp_path):
    """Three starts on one port and state folder: a model loaded in the first is not
    restored by the second (LLMHOST_RESTORE_MODELS=crash: a clean stop is no crash);
    loaded again there, it is restored by the third (always)."""
    port = None
    for i, (restore, expected) in enumerate((("crash", None), ("crash", []), ("always", ["r-llama"]))):
        srv = Server(env={"LLMHOST_STATE_DIR": str(tmp_path), "LLMHOST_RESTORE_MODELS": restore})
        if port is None:
            port = srv.port
        srv.port, srv.url = port, f"http://127.0.0.1:{port}"
        srv.env["LLMHOST_PORT"] = str(port)
        srv.start()
        try:
            if expected is not None:
                assert wait_ready(srv)["loaded"] == expected, (i, restore)
            if i < 2:
                srv.load(tiny_models["llama"], id="r-llama")
        finally:
            srv.stop()
