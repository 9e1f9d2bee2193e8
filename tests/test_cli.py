"""The `llmhost` command line, run as a user runs it: `python -m llmhost` (and the
installed `llmhost` script where there is one), against real servers."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from support import free_port, user_env

COMMANDS = [[sys.executable, "-m", "llmhost"]]
if shutil.which("llmhost"):
    COMMANDS.append([shutil.which("llmhost")])


def llmhost(*args, input=None, url=None, timeout=300, command=None) -> subprocess.CompletedProcess:
    env = user_env()
    if url:
        env["LLMHOST_URL"] = url  # the --url twin
    return subprocess.run([*(command or COMMANDS[0]), *args], input=input, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: os.path.basename(c[-1]))
def test_help_everywhere(command):
    top = llmhost("--help", command=command)
    assert top.returncode == 0, top.stderr
    for name in ("serve", "models", "load", "unload", "chat", "bench"):
        assert name in top.stdout
        sub = llmhost(name, "--help", command=command)
        assert sub.returncode == 0 and "usage" in sub.stdout.lower(), (name, sub.stderr)
    serve = llmhost("serve", "--help", command=command).stdout
    for twin in ("LLMHOST_HOST", "LLMHOST_PORT", "LLMHOST_THREADS", "LLMHOST_API_KEYS",
                 "LLMHOST_MODEL_DIRS", "LLMHOST_LOG_LEVEL", "LLMHOST_MODELS"):
        assert twin in serve, twin
    models = llmhost("models", "--help", command=command).stdout
    assert "LLMHOST_URL" in models and "LLMHOST_API_KEY" in models
    assert "compare-inprocess" in llmhost("bench", "generate", "--help", command=command).stdout


def test_load_models_unload(server, tiny_models):
    load = llmhost("load", tiny_models["gpt2"], "--id", "cli-gpt2", url=server.url)
    assert load.returncode == 0, load.stderr
    assert "loaded cli-gpt2: generate on cpu" in load.stdout
    assert "tensors" in load.stderr  # the progress bar
    listed = llmhost("models", url=server.url)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()[1:]}
    assert rows["cli-gpt2"] == "loaded"
    assert rows.get("llmhost-test/tiny-llama") == "cached"  # the HF cache: loads offline
    unload = llmhost("unload", "cli-gpt2", url=server.url)
    assert unload.returncode == 0 and unload.stdout.strip() == "unloaded cli-gpt2"
    assert "cli-gpt2" not in llmhost("models", url=server.url).stdout


def test_server_errors_are_one_line_and_exit_1(server, tmp_path):
    for args in (["unload", "nope"], ["load", str(tmp_path / "missing")], ["chat", "nope"]):
        r = llmhost(*args, url=server.url, input="hello\n")
        lines = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
        assert r.returncode == 1, (args, r.stderr)
        assert len(lines) == 1 and "model_not_found" in lines[0], (args, r.stderr)
    gone = llmhost("models", "--url", f"http://127.0.0.1:{free_port()}")
    assert gone.returncode == 1 and gone.stderr.startswith("Error: cannot reach llmhost at ")


def test_chat_streams_answers_to_piped_lines(quickstart):
    r = llmhost("chat", "smollm2", "--temperature", "0", "--max-tokens", "30", url=quickstart.url,
                input="What is the capital of France?\n\nAnd of Italy?\n")
    assert r.returncode == 0, r.stderr
    answers = [line for line in r.stdout.splitlines() if line.strip()]
    # one answer per line sent (the empty one is skipped), the second in the conversation's context
    assert len(answers) == 2 and "Paris" in answers[0] and "Rome" in answers[1], r.stdout


@pytest.mark.slow  # starts its own server
def test_serve_flags_reach_the_server(tmp_path, tiny_models):
    """`serve --model SOURCE=ID --port P`: gunicorn with llmhost's settings, the model
    preloaded under its id, the ready message, and SIGTERM stops it."""
    import signal
    import time

    import requests

    port = free_port()
    log = tmp_path / "serve.log"
    env = user_env()
    with open(log, "wb") as out:
        proc = subprocess.Popen([*COMMANDS[0], "serve", "--model", f"{tiny_models['gpt2']}=tiny",
                                 "--port", str(port), "--threads", "4"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while b"llmhost is ready" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.3)
        models = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == ["tiny"]
        assert "models:    tiny" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-2000:]
