"""The engine through a real gunicorn: a client that leaves stops costing CPU,
overload answers 429 (never a hang or a 5xx), one model's queue does not hold
up another, and a mixed soak with cancellations and a load/unload mid-run."""
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from support import Server, assert_error, sample, scrape, validate, wait_for


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks


def cpu_used(pid: int, seconds: float) -> float:
    start = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - start


def wait_idle(server, model, timeout=10.0) -> None:
    """Until the model's scheduler has nothing queued or running (via /metrics
    when present, else by CPU going quiet)."""
    deadline = time.monotonic() + timeout
    pid = server.worker_pid()
    while time.monotonic() < deadline:
        if cpu_used(pid, 0.5) < 0.1:
            return
    raise AssertionError("the worker never went idle")


def test_client_that_leaves_stops_costing_cpu(server, smollm2):
    pid = server.worker_pid()
    wait_idle(server, smollm2)
    body = {"model": smollm2, "prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0}

    # streaming: read one chunk, then hang up
    r = requests.post(server.url + "/v1/completions", json={**body, "stream": True}, stream=True)
    lines = r.iter_lines()
    assert next(line for line in lines if line.startswith(b"data: "))
    busy = cpu_used(pid, 2.0)
    r.close()
    time.sleep(0.5)
    after = cpu_used(pid, 2.0)
    assert busy > 0.3, f"the generation did not use the CPU ({busy:.2f}s): the test proves nothing"
    assert after < 0.25 * busy, (busy, after)

    # non-streaming: the client times out and closes its socket
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(server.url + "/v1/completions", json=body, timeout=1.5)
    time.sleep(0.75)
    after = cpu_used(pid, 2.0)
    assert after < 0.25 * busy, (busy, after)


@pytest.fixture(scope="module")
def small_queue_server(tiny_models):
    srv = Server(env={"LLMHOST_MAX_QUEUE": "2", "LLMHOST_MAX_BATCH": "1"}).start()
    srv.load(tiny_models["long"], id="a")
    srv.load(tiny_models["gpt2"], id="b")
    yield srv
    srv.stop()


def test_overload_answers_429_only(small_queue_server):
    url = small_queue_server.url + "/v1/completions"

    def one(i):
        return requests.post(url, json={"model": "a", "prompt": "hello there", "max_tokens": 200,
                                        "temperature": 0}, timeout=120)

    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(one, range(24)))
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429}, codes
    for r in responses:
        if r.status_code == 429:
            assert_error(r, 429)
            assert int(r.headers["Retry-After"]) >= 1
        else:
            validate(r.json(), "CreateCompletionResponse")


def test_queue_on_one_model_does_not_delay_another(small_queue_server):
    url = small_queue_server.url + "/v1/completions"
    finished: list[float] = []

    def long_request():
        r = requests.post(url, json={"model": "a", "prompt": "hi", "max_tokens": 1000,
                                     "temperature": 0, "logit_bias": {"2": -100}}, timeout=120)
        assert r.status_code == 200, r.text
        finished.append(time.monotonic())

    def running_and_waiting():
        metrics = scrape(small_queue_server)
        return (sample(metrics, "llmhost_running_batch_size", model="a"),
                sample(metrics, "llmhost_queue_depth", model="a"))

    threads = [threading.Thread(target=long_request) for _ in range(3)]  # 1 running + 2 queued
    for waiting, t in enumerate(threads):
        t.start()
        # each in its place before the next (a third arriving before the first ran would find
        # two waiting: 429)
        wait_for(lambda: running_and_waiting() == (1, waiting), interval=0.02)
    started = time.monotonic()
    r = requests.post(url, json={"model": "b", "prompt": "hi", "max_tokens": 4, "temperature": 0})
    answered = time.monotonic()
    assert r.status_code == 200, r.text
    for t in threads:
        t.join()
    assert len(finished) == 3
    assert answered < max(finished), "model b waited for model a's queue"
    assert answered - started < 0.5 * (max(finished) - started)


def test_soak_mixed_traffic(server, tiny_models):
    """16 clients x 8 requests: streaming and not, random max_tokens and
    temperatures, about 1 in 10 streams cancelled after the first chunk, and
    another model loaded and unloaded mid-run."""
    server.load(tiny_models["llama"], id="soak")
    url = server.url
    rng = random.Random(7)
    warm = requests.post(url + "/v1/chat/completions", json={
        "model": "soak", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    assert warm.status_code == 200
    rss_start = server.worker_rss()
    failures: list[str] = []
    counts = {"ok": 0, "cancelled": 0}
    lock = threading.Lock()

    def client(seed: int):
        rng = random.Random(seed)
        with requests.Session() as session:
            for _ in range(8):
                body = {"model": "soak", "max_tokens": rng.randint(1, 48),
                        "temperature": rng.choice([0, 0.5, 1.0, 1.5]),
                        "messages": [{"role": "user", "content": f"question {rng.random()}"}]}
                stream = rng.random() < 0.5
                cancel = stream and rng.random() < 0.2  # about 1 in 10 requests overall
                r = session.post(url + "/v1/chat/completions", json={**body, "stream": stream},
                                 stream=stream, timeout=120)
                if r.status_code != 200:
                    with lock:
                        failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                if not stream:
                    validate(r.json(), "CreateChatCompletionResponse")
                elif cancel:
                    next(line for line in r.iter_lines() if line.startswith(b"data: "))
                    r.close()
                    with lock:
                        counts["cancelled"] += 1
                    continue
                else:
                    events = [line[6:] for line in r.iter_lines() if line.startswith(b"data: ")]
                    assert events[-1] == b"[DONE]"
                    for e in events[:-1]:
                        chunk = json.loads(e)
                        assert "error" not in chunk, chunk
                        validate(chunk, "CreateChatCompletionStreamResponse")
                with lock:
                    counts["ok"] += 1

    def load_unload():
        time.sleep(1.0)
        server.load(tiny_models["gpt2"], id="soak-other")
        r = requests.post(url + "/v1/completions", json={"model": "soak-other", "prompt": "x",
                                                          "max_tokens": 4})
        assert r.status_code == 200
        assert requests.delete(url + "/v1/models/soak-other").status_code == 200

    side = threading.Thread(target=load_unload)
    side.start()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(client, [rng.randint(0, 10**6) for _ in range(16)]))
    side.join()
    assert not failures, failures[:5]
    assert counts["ok"] + counts["cancelled"] == 128 and counts["cancelled"] > 0
    time.sleep(1.0)
    rss_end = server.worker_rss()
    print(f"soak: {counts}, worker RSS {rss_start / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB")
    assert rss_end < rss_start * 1.15 + 64 * 2**20, (rss_start, rss_end)
    assert requests.delete(url + "/v1/models/soak").status_code == 200


def test_unload_during_requests_ends_them_with_a_clear_error(server, tiny_models):
    server.load(tiny_models["long"], id="unload-me")
    body = {"model": "unload-me", "prompt": "hi", "max_tokens": 4000, "temperature": 0,
            "logit_bias": {"2": -100}}  # no EOS: both run until the unload
    result = {}
    plain = threading.Thread(target=lambda: result.update(r=requests.post(
        server.url + "/v1/completions", json=body, timeout=60)))
    plain.start()
    stream = requests.post(server.url + "/v1/completions", json={**body, "stream": True},
                           stream=True, timeout=60)
    lines = stream.iter_lines()
    assert next(line for line in lines if line.startswith(b"data: "))
    # both requests hold the model (the plain one may arrive late on a busy machine)
    wait_for(lambda: sample(scrape(server), "llmhost_model_active_requests", model="unload-me") == 2)
    assert requests.delete(server.url + "/v1/models/unload-me").status_code == 200
    rest = [line[6:] for line in lines if line.startswith(b"data: ")]
    plain.join()
    assert rest[-1] == b"[DONE]"
    error = json.loads(rest[-2])
    validate(error, "ErrorResponse")
    assert "unloaded" in error["error"]["message"]
    err = assert_error(result["r"], 503)
    assert "unloaded" in err["message"]
    assert_error(requests.post(server.url + "/v1/completions", json=body), 404, "model")
