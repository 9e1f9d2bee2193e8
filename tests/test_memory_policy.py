"""LLMHOST_MAX_LOADED_MODELS (least recently used idle model evicted, busy
models never) and keep_alive, through gunicorn and in-process with the real
registry held busy from the test."""
from __future__ import annotations

import time

import pytest

from support import load_local, loaded_ids, sample, scrape, wait_for


def test_max_loaded_models_evicts(policy, tiny_models):
    policy.load(tiny_models["gpt2"], id="first")
    assert loaded_ids(policy) == ["first"]
    policy.load(tiny_models["llama"], id="second")
    assert loaded_ids(policy) == ["second"]
    assert "unloaded first (least recently used" in policy.log()
    assert sample(scrape(policy), "llmhost_loaded_models") == 1
    policy.load(tiny_models["gpt2"], id="first")
    assert loaded_ids(policy) == ["first"]


def test_keep_alive_unloads_idle_models(policy, tiny_models):
    body = policy.load(tiny_models["gpt2"], id="short-lived", keep_alive=1)
    assert body["keep_alive"] == 1.0
    assert "short-lived" in loaded_ids(policy)
    wait_for(lambda: "short-lived" not in loaded_ids(policy), timeout=15)
    wait_for(lambda: "unloaded short-lived (idle for keep_alive=1s)" in policy.log(), timeout=5)


def test_lru_skips_busy_models_and_refuses_when_all_are_busy(make_app, tiny_models):
    from llmhost.engine.errors import Refused
    from llmhost.http.errors import as_api_error
    from llmhost.models.registry import registry

    from llmhost.config import TestConfig

    make_app()  # cleans up what this test loads
    config = TestConfig(MAX_LOADED_MODELS=2)
    load_local(tiny_models["gpt2"], "old", config)
    load_local(tiny_models["gpt2"], "newer", config)
    with registry.use("old"):  # least recently used, but busy
        load_local(tiny_models["gpt2"], "third", config)
        assert sorted(e.id for e in registry.list()) == ["old", "third"]
        with registry.use("third"):
            with pytest.raises(Refused) as info:
                load_local(tiny_models["gpt2"], "fourth", config)
            assert as_api_error(info.value).status == 503 and info.value.code == "model_limit_reached"
            assert "LLMHOST_MAX_LOADED_MODELS=2" in info.value.message
    assert registry.loading() == []
    load_local(tiny_models["gpt2"], "fourth", config)  # both idle now; "third" was released first
    assert sorted(e.id for e in registry.list()) == ["fourth", "old"]


def test_keep_alive_spares_busy_models(make_app, tiny_models):
    from llmhost.models.registry import registry

    make_app()
    load_local(tiny_models["gpt2"], "ttl", keep_alive=0.2)
    with registry.use("ttl"):
        time.sleep(0.4)
        assert registry.reap() == []
    assert registry.find("ttl") is not None  # the request just ended: idle again from now
    wait_for(lambda: registry.find("ttl") is None, timeout=5)  # the reaper thread
