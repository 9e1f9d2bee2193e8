"""LoRA adapters loaded onto a loaded base at run time (models/adapters.py):
the server's greedy output for an adapter equals PEFT's own in-process
PeftModel, the base's equals the plain base, both in one mixed-adapter batch,
and unloading the adapter leaves the base as it was."""
import threading

import pytest
import torch

from support import assert_error, validate

PROMPT = [5, 17, 42, 99, 7, 23, 61]
TOKENS = 10


@pytest.fixture(scope="module")
def adapter_dir(tiny_models, tmp_path_factory):
    """A LoRA adapter for the tiny Llama with random (non-zero) A and B, saved
    as PEFT saves adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, lora_dropout=0.0)
    folder = str(tmp_path_factory.mktemp("lora") / "tiny-lora")
    get_peft_model(base, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def references(tiny_models, adapter_dir):
    """(base tokens, adapter tokens): transformers' and PEFT's own greedy generate."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def greedy(model):
        ids = torch.tensor([PROMPT])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS,
                             do_sample=False)
        return out[0, len(PROMPT):].tolist()

    plain = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    base_tokens = greedy(plain)
    peft = PeftModel.from_pretrained(plain, adapter_dir).eval()
    adapter_tokens = greedy(peft)
    assert base_tokens != adapter_tokens, "the adapter must change the output"
    return base_tokens, adapter_tokens


@pytest.fixture()
def loaded(make_app, tiny_models, adapter_dir):
    app = make_app()
    client = app.test_client()
    r = client.post("/v1/models", json={"model": tiny_models["llama"], "id": "lora-base",
                                        "dtype": "float32"})
    assert r.status_code == 201, r.get_json()
    r = client.post("/v1/models", json={"model": adapter_dir, "base": "lora-base", "id": "lora-a"})
    assert r.status_code == 201, r.get_json()
    yield client
    from llmhost.models.registry import registry
    if registry.find("lora-base"):
        registry.unload("lora-base", force=True)


def complete(client, model):
    r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": TOKENS,
                                             "temperature": 0})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def same(tokenizer, body, tokens: list[int]) -> bool:
    return body["choices"][0]["text"] == tokenizer.decode(tokens, skip_special_tokens=True)


def test_listed_with_its_base_and_409_for_the_base(loaded, adapter_dir):
    listed = {m["id"]: m for m in loaded.get("/v1/models").get_json()["data"]}
    validate(loaded.get("/v1/models").get_json(), "ListModelsResponse")
    assert listed["lora-a"]["base"] == "lora-base" and "base" not in listed["lora-base"]
    assert 0 < listed["lora-a"]["parameters"] < listed["lora-base"]["parameters"]
    err = assert_error(loaded.delete("/v1/models/lora-base"), 409, "model")
    assert "lora-a" in err["message"]
    # loading again under the same id is the same adapter; another base is a conflict
    again = loaded.post("/v1/models", json={"model": adapter_dir, "base": "lora-base", "id": "lora-a"})
    assert again.status_code == 200


def test_bad_adapter_loads(loaded, tiny_models, adapter_dir):
    assert_error(loaded.post("/v1/models", json={"model": adapter_dir, "base": "nope", "id": "x"}),
                 404, "base")
    assert_error(loaded.post("/v1/models", json={"model": tiny_models["llama"], "base": "lora-base",
                                                 "id": "x"}), 400, "model")
    assert_error(loaded.post("/v1/models", json={"model": adapter_dir, "id": "x"}), 400, "base")
    assert_error(loaded.post("/v1/models", json={"model": adapter_dir, "base": "lora-a",
                                                 "id": "x"}), 400, "base")


def test_greedy_equals_peft_in_one_batch(loaded, references):
    """Both requests wait while the scheduler is held, so they are admitted,
    prefilled and decoded together; the forwards it ran say so."""
    from llmhost.models.registry import registry
    from llmhost.engine.scheduler import BASE_ADAPTER

    base_ref, adapter_ref = references
    entry = registry.get("lora-base")
    scheduler, tokenizer = entry.engine, entry.tokenizer
    seen: list[list[str]] = []
    forward = scheduler._forward

    def recording(ids, mask, positions, cache, adapters, extra=None, decode=False):
        seen.append(list(adapters))
        return forward(ids, mask, positions, cache, adapters, extra, decode)

    scheduler._forward = recording
    release = threading.Event()
    results: dict = {}
    holder = threading.Thread(target=scheduler.between_steps, args=(lambda: release.wait(30),))
    holder.start()
    threads = [threading.Thread(target=lambda m=m: results.__setitem__(m, complete(loaded, m)))
               for m in ("lora-base", "lora-a")]
    try:
        for t in threads:
            t.start()
        for _ in range(300):
            if len(scheduler._waiting) == 2:
                break
            threading.Event().wait(0.05)
        assert len(scheduler._waiting) == 2
    finally:
        release.set()
        for t in threads + [holder]:
            t.join(60)
        scheduler._forward = forward
    assert same(tokenizer, results["lora-base"], base_ref)
    assert same(tokenizer, results["lora-a"], adapter_ref)
    assert results["lora-a"]["model"] == "lora-a"
    name = registry.get("lora-a").engine.name
    assert sorted(seen[0]) == sorted([BASE_ADAPTER, name]), seen   # one prefill, both rows
    assert sum(len(s) == 2 for s in seen) >= 2, seen                # and decode steps together


def test_unload_adapter_leaves_base_unchanged(loaded, references):
    from llmhost.models.registry import registry

    base_ref, adapter_ref = references
    tokenizer = registry.get("lora-base").tokenizer
    assert same(tokenizer, complete(loaded, "lora-a"), adapter_ref)
    r = loaded.delete("/v1/models/lora-a")
    assert r.status_code == 200 and r.get_json()["deleted"] is True
    assert_error(loaded.post("/v1/completions", json={"model": "lora-a", "prompt": "x"}), 404, "model")
    model = registry.get("lora-base").model
    assert not any("lora_" in name for name, _ in model.named_parameters())
    assert same(tokenizer, complete(loaded, "lora-base"), base_ref)


def test_force_unloads_base_with_adapters(loaded):
    r = loaded.delete("/v1/models/lora-base?force=true")
    assert r.status_code == 200
    ids = [m["id"] for m in loaded.get("/v1/models").get_json()["data"]]
    assert "lora-a" not in ids and "lora-base" not in ids
