"""Prometheus metrics, served on /metrics.

A registry of our own (not prometheus_client's global one) so that /metrics shows
only llmhost's metrics and tests can read them without interference. Values
that already live elsewhere (loaded models, queue depth, running batch size) are
read at scrape time by a collector, so they can never drift from the truth.
"""
from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("llmhost")

REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

REQUESTS = Counter("llmhost_requests", "HTTP requests by route, method and status.",
                   ("route", "method", "status"), registry=REGISTRY)
REQUEST_SECONDS = Histogram("llmhost_request_duration_seconds",
                            "Time from request to the end of the response (streams included).",
                            ("route",), buckets=LATENCY_BUCKETS, registry=REGISTRY)
PROMPT_TOKENS = Counter("llmhost_prompt_tokens", "Prompt tokens processed.", ("model",),
                        registry=REGISTRY)
COMPLETION_TOKENS = Counter("llmhost_completion_tokens", "Completion tokens generated.",
                            ("model",), registry=REGISTRY)
TTFT = Histogram("llmhost_time_to_first_token_seconds",
                 "Time from submitting a generation to its first token.", ("model",),
                 buckets=LATENCY_BUCKETS, registry=REGISTRY)
PREFIX_HITS = Counter("llmhost_prefix_cache_hits", "Prompts that reused a cached prefix.",
                      ("model",), registry=REGISTRY)
PREFIX_TOKENS = Counter("llmhost_prefix_cache_reused_tokens",
                        "Prompt tokens read from the prefix cache instead of prefilled.",
                        ("model",), registry=REGISTRY)
PREFIX_EVICTIONS = Counter("llmhost_prefix_cache_evictions",
                           "Cached sequences dropped to stay within LLMHOST_PREFIX_CACHE_MB.",
                           ("model",), registry=REGISTRY)
LOAD_SECONDS = Histogram("llmhost_model_load_seconds", "Time to load a model.", ("model",),
                         buckets=LOAD_BUCKETS, registry=REGISTRY)


USAGE_STORE_ERRORS = Counter("llmhost_usage_store_errors",
                             "Usage or quota reads and writes that failed (serving went on).",
                             registry=REGISTRY)
# Per key only for keys with a name (LLMHOST_API_KEYS name:key or the keys
# file): names come from the configuration, so the series are bounded; every
# other key counts under "(unnamed)".
KEY_REQUESTS = Counter("llmhost_key_requests", "Requests that reached a model, by named key.",
                       ("key", "model"), registry=REGISTRY)
KEY_TOKENS = Counter("llmhost_key_tokens", "Tokens by named key, model and kind.",
                     ("key", "model", "kind"), registry=REGISTRY)


_KEY_SERIES: set[tuple[str, str]] = set()   # (key, model) pairs with series, for forget_model


def record_key_usage(name: str | None, model: str, prompt_tokens: int,
                     completion_tokens: int) -> None:
    key = name or "(unnamed)"
    _KEY_SERIES.add((key, model))
    KEY_REQUESTS.labels(key, model).inc()
    if prompt_tokens:
        KEY_TOKENS.labels(key, model, "prompt").inc(prompt_tokens)
    if completion_tokens:
        KEY_TOKENS.labels(key, model, "completion").inc(completion_tokens)


def record_tokens(model: str, prompt_tokens: int, completion_tokens: int) -> None:
    """Called by the engine when a generation finishes."""
    if prompt_tokens:
        PROMPT_TOKENS.labels(model).inc(prompt_tokens)
    if completion_tokens:
        COMPLETION_TOKENS.labels(model).inc(completion_tokens)


def observe_ttft(model: str, seconds: float) -> None:
    """Called by the engine when a generation yields its first token."""
    TTFT.labels(model).observe(seconds)


def observe_prefix_hit(model: str, tokens: int) -> None:
    """Called by the engine's prefix cache when a prompt reuses `tokens`."""
    PREFIX_HITS.labels(model).inc()
    PREFIX_TOKENS.labels(model).inc(tokens)


def observe_prefix_evictions(model: str, count: int) -> None:
    PREFIX_EVICTIONS.labels(model).inc(count)


def observe_load(model: str, seconds: float) -> None:
    LOAD_SECONDS.labels(model).observe(seconds)


# Label values come from a fixed set: a client inventing HTTP methods must not
# add one series per method (unbounded /metrics and memory).
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    method = method if method in METHODS else "other"
    status = status if isinstance(status, int) and 100 <= status < 600 else 0
    REQUESTS.labels(route, method, str(status)).inc()
    REQUEST_SECONDS.labels(route).observe(seconds)


def forget_model(model: str) -> None:
    """An unloaded model's series go with it, so ids loaded and unloaded over
    time do not pile up in /metrics."""
    for metric in (PROMPT_TOKENS, COMPLETION_TOKENS, TTFT, LOAD_SECONDS, PREFIX_HITS,
                   PREFIX_TOKENS, PREFIX_EVICTIONS):
        try:
            metric.remove(model)
        except KeyError:
            pass
    for key, of in [pair for pair in _KEY_SERIES if pair[1] == model]:
        _KEY_SERIES.discard((key, of))
        for labels in ((KEY_REQUESTS, (key, model)), (KEY_TOKENS, (key, model, "prompt")),
                       (KEY_TOKENS, (key, model, "completion"))):
            try:
                labels[0].remove(*labels[1])
            except KeyError:
                pass


class ModelCollector:
    """Loaded models, requests in flight, queue depth and running batch size,
    read from the registry and each model's engine at scrape time. The registry
    hands over its listing (`watch_models`), so this module imports neither it
    nor the engine."""

    def __init__(self, entries: Callable[[], list]) -> None:
        self.entries = entries

    def collect(self):
        loaded = GaugeMetricFamily("llmhost_loaded_models", "Models loaded now.")
        active = GaugeMetricFamily("llmhost_model_active_requests",
                                   "Requests using the model now.", labels=["model"])
        queued = GaugeMetricFamily("llmhost_queue_depth",
                                   "Requests waiting for the model's scheduler.", labels=["model"])
        running = GaugeMetricFamily("llmhost_running_batch_size",
                                    "Sequences the scheduler is decoding together now.",
                                    labels=["model"])
        memory = GaugeMetricFamily("llmhost_model_memory_bytes",
                                   "Bytes of weights and buffers.", labels=["model"])
        # Unlabelled sums over the models: what an HPA (prometheus-adapter, KEDA) and the
        # Gateway API Inference Extension's endpoint picker read (vLLM's num_requests_*).
        waiting_all = GaugeMetricFamily("llmhost_requests_waiting",
                                        "Requests waiting for a scheduler, all models.")
        running_all = GaugeMetricFamily("llmhost_requests_running",
                                        "Sequences being decoded now, all models.")
        total_waiting = total_running = 0
        cached = GaugeMetricFamily("llmhost_prefix_cache_bytes",
                                   "Bytes of KV cache the prefix cache holds.", labels=["model"])
        entries = self.entries()
        loaded.add_metric([], len(entries))
        for entry in entries:
            active.add_metric([entry.id], entry.active)
            loaded_info = entry.loaded
            if loaded_info is not None:
                memory.add_metric([entry.id], loaded_info.memory_bytes)
            stats = getattr(entry.engine, "stats", None)
            if stats is None:
                continue
            try:
                values = stats()
            except Exception:  # a model being unloaded: skip it this scrape
                log.debug("stats() failed for %s", entry.id, exc_info=True)
                continue
            queued.add_metric([entry.id], values.get("queued", 0))
            running.add_metric([entry.id], values.get("running", 0))
            total_waiting += values.get("queued", 0)
            total_running += values.get("running", 0)
            if "prefix_cache_bytes" in values:
                cached.add_metric([entry.id], values["prefix_cache_bytes"])
        waiting_all.add_metric([], total_waiting)
        running_all.add_metric([], total_running)
        yield from (loaded, active, queued, running, memory, waiting_all, running_all, cached)

    def describe(self):
        return []


_models: ModelCollector | None = None


def watch_models(entries: Callable[[], list]) -> None:
    """create_app hands over the model registry's `list`; until then (and
    without it) /metrics has no per-model gauges. Calling again replaces the
    source: one collector per process."""
    global _models
    if _models is None:
        _models = ModelCollector(entries)
        REGISTRY.register(_models)
    else:
        _models.entries = entries


def exposition() -> tuple[bytes, str]:
    """(body, content type) of the Prometheus text format."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
