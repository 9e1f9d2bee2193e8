"""Prometheus metrics: requests, loads, loaded models, tokens and time to first
token, fed by the engine and the request log."""
from __future__ import annotations

import json

import requests
from prometheus_client.parser import text_string_to_metric_families

from support import loaded_ids, sample, scrape, wait_for


def test_metrics_count_requests_and_loads(policy, tiny_models):
    labels = {"route": "/v1/models", "method": "GET", "status": "200"}
    before = scrape(policy)
    for _ in range(3):
        requests.get(policy.url + "/v1/models")
    after = wait_for(lambda: (lambda m: m if sample(m, "llmhost_requests_total", **labels)
                              >= sample(before, "llmhost_requests_total", **labels) + 3 else None)(
        scrape(policy)), timeout=10)
    assert sample(after, "llmhost_request_duration_seconds_count", route="/v1/models") >= 3
    policy.load(tiny_models["llama"], id="load-metered")
    metrics = scrape(policy)
    assert sample(metrics, "llmhost_model_load_seconds_count", model="load-metered") == 1
    assert sample(metrics, "llmhost_model_load_seconds_sum", model="load-metered") > 0
    assert sample(metrics, "llmhost_loaded_models") == len(loaded_ids(policy)) == 1
    assert sample(metrics, "llmhost_model_memory_bytes", model="load-metered") > 0
    assert sample(metrics, "llmhost_model_active_requests", model="load-metered") == 0
    r = requests.get(policy.url + "/v1/models/nope")
    assert r.status_code == 404
    missing = {"route": "/v1/models/<path:model_id>", "method": "GET", "status": "404"}
    wait_for(lambda: sample(scrape(policy), "llmhost_requests_total", **missing) >= 1, timeout=10)


def test_token_and_ttft_metrics():
    from llmhost.engine import metrics

    def read():
        body, _ = metrics.exposition()
        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(body.decode()) for s in f.samples}

    before = read()
    metrics.record_tokens("m-test", 7, 3)
    metrics.observe_ttft("m-test", 0.05)
    after = read()
    for name, delta in (("llmhost_prompt_tokens_total", 7), ("llmhost_completion_tokens_total", 3),
                        ("llmhost_time_to_first_token_seconds_count", 1)):
        assert sample(after, name, model="m-test") - sample(before, name, model="m-test") == delta


def test_generation_feeds_token_metrics_and_log_lines(policy, metered):
    """The engine's token counts reach /metrics and the request line, a stream's
    at its end; the prompt text itself is not logged."""
    before = scrape(policy)
    secret = "zebra-quokka-prompt"
    r = requests.post(policy.url + "/v1/completions", headers={"X-Request-Id": "gen-plain"}, json={
        "model": "metered", "prompt": secret, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    with requests.post(policy.url + "/v1/completions", headers={"X-Request-Id": "gen-stream"}, json={
            "model": "metered", "prompt": secret, "max_tokens": 5, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}, stream=True) as r:
        events = [line for line in r.iter_lines() if line.startswith(b"data: {")]
    streamed = json.loads(events[-1][6:])["usage"]

    def line(rid):
        return next((x for x in policy.log().splitlines() if f"request_id={rid} " in x), None)

    plain, stream = wait_for(lambda: line("gen-plain")), wait_for(lambda: line("gen-stream"))
    assert (f"model=metered prompt_tokens={usage['prompt_tokens']} "
            f"completion_tokens={usage['completion_tokens']}") in plain
    assert f"completion_tokens={streamed['completion_tokens']}" in stream
    assert secret not in policy.log()

    def grew(metrics, name):
        return sample(metrics, name, model="metered") - sample(before, name, model="metered")

    # the engine records a generation's tokens right after handing over its last event
    after = wait_for(lambda: (lambda m: m if grew(m, "llmhost_prompt_tokens_total") >= (
        usage["prompt_tokens"] + streamed["prompt_tokens"]) else None)(scrape(policy)), timeout=10)
    for name, key in (("llmhost_prompt_tokens_total", "prompt_tokens"),
                      ("llmhost_completion_tokens_total", "completion_tokens")):
        assert grew(after, name) == usage[key] + streamed[key], name
    ttft = "llmhost_time_to_first_token_seconds_count"
    assert sample(after, ttft, model="metered") - sample(before, ttft, model="metered") == 2
