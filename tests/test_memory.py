"""Memory-aware loading (issue 9): a model that will not fit is refused with a
507 giving both numbers, before anything is loaded. The limit is lowered with
LLMHOST_MEMORY_LIMIT, not by filling the machine."""
import os

import pytest
import requests
import torch

from llmhost.config import TestConfig
from llmhost.models.loading import LoadSpec, load
from llmhost.models.memory import estimate, free_cpu_bytes
from llmhost.models.quantize import auto_cpu_dtype
from support import Server, assert_error


@pytest.mark.slow  # reads SmolLM2's GGUF metadata three times (its 49k-token vocabulary each time)
def test_estimate_matches_what_loading_takes(tiny_models, smollm2_gguf):
    loaded = load(LoadSpec(model=tiny_models["llama"]), TestConfig())
    guess = estimate(tiny_models["llama"], None, getattr(torch, loaded.dtype))  # auto: bf16 on bf16 CPUs
    assert abs(guess - loaded.memory_bytes) <= 0.1 * loaded.memory_bytes, (guess, loaded.memory_bytes)
    # GGUF: dequantized to float32, so about 4 bytes per parameter of SmolLM2-135M
    folder, name = os.path.split(smollm2_gguf)
    assert 120e6 * 4 < estimate(folder, name, torch.float32) < 170e6 * 4
    assert estimate(folder, name, torch.bfloat16) * 2 == estimate(folder, name, torch.float32)
    assert free_cpu_bytes() > 0


@pytest.fixture(scope="module")
def small_memory(tiny_models):
    need = estimate(tiny_models["llama"], None, auto_cpu_dtype())  # what the server's auto loads
    # room for one tiny llama with the default 20 % headroom, not for two
    srv = Server(env={"LLMHOST_MEMORY_LIMIT": str(int(need * 1.5))}).start()
    srv.need = need
    yield srv
    srv.stop()


def test_load_that_does_not_fit_is_507(small_memory, tiny_models, smollm2_gguf):
    srv = small_memory
    url = srv.url + "/v1/models"
    r = requests.post(url, json={"model": smollm2_gguf, "id": "too-big"}, timeout=120)
    error = assert_error(r, 507, "model")
    assert "LLMHOST_MEMORY_LIMIT" in error["message"] and "bytes" in error["message"]
    assert requests.post(url, json={"model": tiny_models["llama"], "id": "m1"},
                         timeout=120).status_code == 201
    r = requests.post(url, json={"model": tiny_models["llama"], "id": "m2"}, timeout=120)
    error = assert_error(r, 507, "model")
    assert str(srv.need) in error["message"]          # what it needs, and what is left
    ids = {m["id"] for m in requests.get(url, timeout=10).json()["data"]}
    assert ids == {"m1"}
    assert requests.delete(url + "/m1", timeout=60).status_code == 200
    assert requests.post(url, json={"model": tiny_models["llama"], "id": "m2"},
                         timeout=120).status_code == 201


def test_headroom_setting(make_app, tiny_models):
    need = estimate(tiny_models["llama"], None, auto_cpu_dtype())  # what the server's auto loads
    # The settings as the server reads them from LLMHOST_MEMORY_LIMIT / _HEADROOM (the
    # Flask test client: the refusal happens before anything loads, gunicorn adds nothing).
    client = make_app(MEMORY_LIMIT=int(need * 1.5), MEMORY_HEADROOM=1.0).test_client()
    r = client.post("/v1/models", json={"model": tiny_models["llama"]})
    assert "LLMHOST_MEMORY_HEADROOM=1" in assert_error(r, 507)["message"]
