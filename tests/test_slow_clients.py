"""No client can starve the server (issue 9, section 4): slow senders wait in
the worker's event loop (llmhost/server/gworker.py) instead of holding threads, so
/health and chat answer while 40 connections trickle one header byte per
second or stall halfway through a body; they are dropped after
LLMHOST_READ_TIMEOUT. And the nginx config docs/deploying.md recommends is valid."""
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest
import requests

from support import Server, readme_block


@pytest.fixture(scope="module")
def few_threads(tiny_models):
    srv = Server(env={"LLMHOST_THREADS": "8", "LLMHOST_READ_TIMEOUT": "6"}).start()
    srv.load(tiny_models["llama"], id="slow-llama")
    yield srv
    srv.stop()


def trickle(port: int, payload: bytes, stop: threading.Event, closed: list) -> None:
    """Send `payload` one byte per second until stopped; note when the server
    closes the connection."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(0.05)
    try:
        for byte in payload:
            if stop.wait(1.0):
                break
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    closed.append(time.monotonic())
                    return
            except socket.timeout:
                continue
            except OSError:
                closed.append(time.monotonic())
                return
    finally:
        sock.close()


def test_slow_clients_do_not_starve_the_server(few_threads):
    srv = few_threads
    stop = threading.Event()
    closed: list = []
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    half = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
           b"Content-Length: 1000\r\n\r\n" + b'{"model": "slow-llama", "prompt": "'
    threads = [threading.Thread(target=trickle, args=(srv.port, head, stop, closed), daemon=True)
               for _ in range(40)]
    # half a body, sent at once, then silence
    stalled = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(half)
        stalled.append(sock)
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)     # every slow connection is open and sending
        for _ in range(5):
            t0 = time.monotonic()
            assert requests.get(srv.url + "/health", timeout=1).status_code == 200
            assert time.monotonic() - t0 < 1.0
            r = requests.post(srv.url + "/v1/completions", timeout=10,
                              json={"model": "slow-llama", "prompt": "hi", "max_tokens": 4})
            assert r.status_code == 200, r.text
            time.sleep(0.3)
        # the server drops them after LLMHOST_READ_TIMEOUT (6 s), not never
        deadline = time.monotonic() + 10
        while len(closed) < 40 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(closed) == 40, f"only {len(closed)} of 40 slow connections were dropped"
        assert min(closed) - started > 4
        for sock in stalled:    # half a body: dropped too, never left hanging
            sock.settimeout(5)
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass
    finally:
        stop.set()
        for sock in stalled:
            sock.close()


def test_default_threads_fit_batch_and_queue():
    from llmhost.config import Config
    config = Config(environ={})
    assert config.THREADS >= config.MAX_BATCH + config.MAX_QUEUE + 8


def test_health_answers_within_a_second_under_generation_load(server, tiny_models):
    """40 streams with n=8 on default settings: every stream holds a thread,
    and the default LLMHOST_THREADS leaves room for the probes."""
    srv = server
    srv.load(tiny_models["llama"], id="probe-llama")
    body = {"model": "probe-llama", "prompt": "once upon a time", "max_tokens": 200,
            "temperature": 1, "n": 8, "stream": True}
    stop = threading.Event()

    def load():
        while not stop.is_set():
            with requests.post(srv.url + "/v1/completions", json=body, stream=True, timeout=60) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        break

    workers = [threading.Thread(target=load, daemon=True) for _ in range(40)]
    for w in workers:
        w.start()
    try:
        time.sleep(3.0)
        for _ in range(10):
            for path in ("/health", "/ready"):
                t0 = time.monotonic()
                assert requests.get(srv.url + path, timeout=1).status_code == 200
                assert time.monotonic() - t0 < 1.0
            time.sleep(0.2)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
        requests.delete(srv.url + "/v1/models/probe-llama", timeout=60)


def readme_nginx() -> str:
    """The nginx config docs/deploying.md recommends: what is tested is what users copy."""
    return readme_block("nginx", "docs/deploying.md") + "\n"


def test_nginx_config_is_valid(tmp_path):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    site = readme_nginx()
    for needed in ("proxy_buffering off", "client_max_body_size", "client_header_timeout",
                   "client_body_timeout", "proxy_read_timeout"):
        assert needed in site, needed
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
                    "events {}\nhttp {\n" f"access_log {tmp_path}/access.log;\n"
                    + site.replace("listen 443 ssl;", "listen 127.0.0.1:18999;")
                          .replace("/var/log/nginx", str(tmp_path)) + "\n}\n")
    out = subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
