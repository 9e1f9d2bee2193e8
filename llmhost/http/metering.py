"""Who used what, and how much they may: one Meter per request.

A request that reaches a model is counted once, per key, model and endpoint
(store/usage.py), with the tokens its runs report. Limits come from the TOML
keys file (defaults, groups, keys) or the LLMHOST_RATE_LIMIT_* /
LLMHOST_TOKEN_QUOTA_* settings, and are checked before any model work:
- requests per minute when the request names its model (api/access.py);
- tokens per minute and daily/monthly token quotas once the request's worst
  case is known (prompt plus max_tokens for every choice, api/serving.py),
  settled to the real count when the answer is complete, as OpenAI does.
Per-minute buckets live in this process (each replica has its own); quotas
are counted in the shared database, so they hold across replicas.

Every model response carries OpenAI's x-ratelimit-* headers for the limits
that apply; a request over a limit gets OpenAI's 429 with Retry-After.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from flask import Flask, current_app, request

from ..config import settings
from ..engine import metrics
from ..store import usage as usage_db
from . import auth
from .errors import APIError
from .ratelimit import Buckets, duration

log = logging.getLogger("llmhost")

ENVIRON_METER = "llmhost.meter"


@dataclass
class Meter:
    identity: auth.Identity
    endpoint: str
    subject: str
    limits: dict
    model: str | None = None
    runs: list = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reserved: int = 0                                   # tokens taken from the TPM bucket
    quota_reserved: list = field(default_factory=list)  # (period, tokens)

    def totals(self) -> tuple[int, int, int]:
        prompt, completion, cached = self.prompt_tokens, self.completion_tokens, self.cached_tokens
        for run in self.runs:
            prompt += run.prompt_tokens
            completion += run.completion_tokens
            cached += run.cached_tokens
        return prompt, completion, cached


def limits_for(identity: auth.Identity, keys: auth.Keys, config) -> tuple[str, dict]:
    """(subject, limits): a key in a group shares the group's limits; a named
    key with limits of its own has them; every other key gets the defaults
    (the keys file's [defaults] over the settings) in a bucket of its own."""
    file = keys.limits
    limits = {name: value for name, value in (
        ("requests_per_minute", config.RATE_LIMIT_RPM),
        ("tokens_per_minute", config.RATE_LIMIT_TPM),
        ("tokens_per_day", config.TOKEN_QUOTA_DAY),
        ("tokens_per_month", config.TOKEN_QUOTA_MONTH)) if value}
    limits.update(file.get("defaults", {}))
    if identity.group:
        limits.update(file["groups"][identity.group])
        subject = "group:" + identity.group
    elif identity.name:
        limits.update(file.get("keys", {}).get(identity.name, {}))
        subject = "key:" + identity.name
    else:
        subject = "key:" + (identity.digest or "anonymous")
    return subject, {k: v for k, v in limits.items() if v}


def _begin() -> None:
    if request.url_rule is None or request.method == "OPTIONS":
        return
    identity = auth.identity()
    subject, limits = limits_for(identity, current_app.extensions["llmhost_keys"], settings())
    request.environ[ENVIRON_METER] = Meter(identity, request.url_rule.rule, subject, limits)


def current() -> Meter | None:
    return request.environ.get(ENVIRON_METER)


def _rate_limited(kind: str, limit: int, used: int, asked: int, wait: float) -> APIError:
    unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
    if math.isinf(wait):
        return APIError(429, f"Request too large: it may use {asked} tokens, more than the limit "
                             f"of {limit} {unit}. Lower max_tokens or the input.",
                        type=kind, code="rate_limit_exceeded", headers={"x-should-retry": "false"})
    return APIError(429, f"Rate limit reached on {unit}: Limit {limit}, Used {used}, Requested "
                         f"{asked}. Please try again in {duration(wait)}.",
                    type=kind, code="rate_limit_exceeded",
                    headers={"Retry-After": str(max(1, math.ceil(wait))),
                             "retry-after-ms": str(math.ceil(wait * 1000))})


def _quota_spent(period: str, quota: int) -> APIError:
    return APIError(429, f"You exceeded your token quota for this {period} ({quota} tokens). "
                         "It renews at the start of the next one (UTC); ask the server's "
                         "operator for more.",
                    type="insufficient_quota", code="insufficient_quota",
                    headers={"Retry-After": str(_seconds_to_next(period)),
                             "x-should-retry": "false"})


def _seconds_to_next(period: str) -> int:
    t = time.gmtime()
    if period == "day":
        return 86400 - (t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return max(1, int(time.mktime((year, month, 1, 0, 0, 0, 0, 0, 0)) - time.timezone
                      - time.time()))


def _buckets() -> Buckets:
    return current_app.extensions["llmhost_buckets"]


def admit_request() -> None:
    """Count the request against its requests-per-minute limit, and refuse it
    at once when a token quota is already spent. Called before the model is
    looked up, so nothing runs for a refused request."""
    meter = current()
    if meter is None:
        return
    limit = meter.limits.get("requests_per_minute")
    if limit:
        wait = _buckets().take(meter.subject, "requests", limit, 1)
        if wait:
            remaining, _ = _buckets().state(meter.subject, "requests", limit)
            raise _rate_limited("requests", limit, limit - remaining, 1, wait)
    store = usage_store()
    for period, key in (("day", "tokens_per_day"), ("month", "tokens_per_month")):
        quota = meter.limits.get(key)
        if quota and store is not None:
            try:
                spent = store.used(meter.subject, usage_db.periods(time.time())[period]) >= quota
            except Exception as exc:  # a store that fails never blocks serving
                _store_failed(exc)
                continue
            if spent:
                raise _quota_spent(period, quota)


def admit_tokens(tokens: int) -> None:
    """Take a request's worst case (prompt plus every choice's max_tokens) from
    its tokens-per-minute bucket and its quotas, or refuse it. The real count
    is settled when the answer is complete."""
    meter = current()
    if meter is None:
        return
    limit = meter.limits.get("tokens_per_minute")
    if limit:
        wait = _buckets().take(meter.subject, "tokens", limit, tokens)
        if wait:
            remaining, _ = _buckets().state(meter.subject, "tokens", limit)
            raise _rate_limited("tokens", limit, limit - remaining, tokens, wait)
        meter.reserved = tokens
    store = usage_store()
    now = usage_db.periods(time.time())
    for period, key in (("day", "tokens_per_day"), ("month", "tokens_per_month")):
        quota = meter.limits.get(key)
        if not quota or store is None:
            continue
        try:
            fits = store.reserve(meter.subject, now[period], tokens, quota)
        except Exception as exc:
            _store_failed(exc)
            continue
        if not fits:
            _release(meter, store)
            raise _quota_spent(period, quota)
        meter.quota_reserved.append((now[period], tokens))


def _release(meter: Meter, store) -> None:
    """Give back what a refused request had reserved."""
    if meter.reserved:
        _buckets().give(meter.subject, "tokens", meter.limits["tokens_per_minute"], meter.reserved)
        meter.reserved = 0
    for period, tokens in meter.quota_reserved:
        store.settle(meter.subject, period, -tokens)
    meter.quota_reserved = []


def track(run) -> None:
    """A generation run whose tokens this request's usage counts at its end."""
    meter = current()
    if meter is not None:
        meter.runs.append(run)


def add(prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
    """Tokens of work that is not a generation run (embeddings)."""
    meter = current()
    if meter is not None:
        meter.prompt_tokens += prompt_tokens
        meter.completion_tokens += completion_tokens


def reached(model_id: str) -> None:
    meter = current()
    if meter is not None:
        meter.model = model_id


def usage_store():
    """The usage store, opened on first use in the response store's database once
    its schema is at head (its tables are the store's migrations; LLMHOST_USAGE=0: none)."""
    app = current_app
    if not settings().USAGE:
        return None
    found = app.extensions.get("llmhost_usage")
    if found is None:
        from ..store import responses
        try:
            store = responses.current()
            store.check()         # its schema (usage tables included) at head, else StoreBehind
            found = usage_db.UsageStore(store.engine, settings().USAGE_FLUSH_S)
        except Exception as exc:
            _store_failed(exc)
            return None
        app.extensions["llmhost_usage"] = found
    return found


def _store_failed(exc: BaseException) -> None:
    metrics.USAGE_STORE_ERRORS.inc()
    log.error("usage store: %s", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)


def _headers(response):
    """OpenAI's rate-limit headers on a model response, and the usage count
    once the answer is complete (streams: when the stream ends)."""
    meter = current()
    if meter is None or meter.model is None:
        return response
    for kind, key in (("requests", "requests_per_minute"), ("tokens", "tokens_per_minute")):
        limit = meter.limits.get(key)
        if limit:
            remaining, reset = _buckets().state(meter.subject, kind, limit)
            response.headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            response.headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            response.headers[f"x-ratelimit-reset-{kind}"] = duration(reset)
    store, buckets, status = usage_store(), _buckets(), response.status_code
    response.call_on_close(lambda: _settle(meter, store, buckets, status))
    return response


def _settle(meter: Meter, store, buckets: Buckets, status: int) -> None:
    """After the last byte: the real tokens replace the reservation, and the
    request is counted. Runs outside the request context (streams end there)."""
    try:
        prompt, completion, cached = meter.totals()
        used = prompt + completion
        if meter.reserved:
            buckets.give(meter.subject, "tokens", meter.limits["tokens_per_minute"],
                         meter.reserved - used)
        if store is None:
            return
        for period, tokens in meter.quota_reserved:
            store.settle(meter.subject, period, used - tokens)
        store.add(usage_db.Record(
            key=meter.identity.digest or "", key_name=meter.identity.name, model=meter.model,
            endpoint=meter.endpoint, requests=1, prompt_tokens=prompt, cached_tokens=cached,
            completion_tokens=completion, errors=int(status >= 400)))
        metrics.record_key_usage(meter.identity.name, meter.model, prompt, completion)
    except Exception as exc:  # never an error for a client whose answer is out
        _store_failed(exc)


def init_app(app: Flask) -> None:
    """After auth (it names the caller) and before the routes."""
    app.extensions["llmhost_buckets"] = Buckets()
    app.before_request(_begin)
    app.after_request(_headers)
