"""Ollama's API with the official `ollama` Python client: chat (plain and
streamed), generate, structured `format`, a tool call, embed, list, ps, show,
pull with progress, delete, and errors as the client's ResponseError. SmolLM2
and MiniLM in the shared server; keys and framing on an in-process app."""
import json

import jsonschema
import ollama
import pytest
import requests

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                         "country": {"type": "string", "maxLength": 20}},
        "required": ["city", "country"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
GREEDY = {"temperature": 0, "num_predict": 24}
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server, smollm2, minilm_dir):
    server.load(minilm_dir, id="minilm")
    return ollama.Client(host=server.url, timeout=300)


def test_chat_plain_and_streamed_agree(client):
    reply = client.chat(model="smollm2", messages=ASK, options=GREEDY)
    assert reply.model == "smollm2" and reply.done and reply.done_reason in ("stop", "length")
    assert reply.message.role == "assistant" and reply.message.content
    assert 0 < reply.eval_count <= 24 and reply.prompt_eval_count > 5
    assert reply.total_duration >= reply.eval_duration > 0
    pieces = list(client.chat(model="smollm2", messages=ASK, options=GREEDY, stream=True))
    assert all(not p.done for p in pieces[:-1]) and pieces[-1].done
    assert "".join(p.message.content for p in pieces) == reply.message.content
    assert pieces[-1].eval_count == reply.eval_count


def test_generate(client):
    reply = client.generate(model="smollm2", prompt="What is the capital of France?",
                            system="Answer in one word.", options=GREEDY)
    assert reply.done and reply.response and reply.prompt_eval_count > 5
    streamed = list(client.generate(model="smollm2", prompt="What is the capital of France?",
                                    system="Answer in one word.", options=GREEDY, stream=True))
    assert "".join(p.response for p in streamed) == reply.response
    loaded = client.generate(model="smollm2", prompt="")          # only checks the model
    assert loaded.done and loaded.done_reason == "load"


def test_structured_format(client):
    reply = client.chat(model="smollm2", format=CITY, options={**GREEDY, "num_predict": 60},
                        messages=[{"role": "user", "content": "Describe Paris as JSON."}])
    jsonschema.validate(json.loads(reply.message.content), CITY)
    assert "\n" not in reply.message.content          # compact: no free whitespace
    anything = client.generate(model="smollm2", prompt="A JSON object about Rome.", format="json",
                               options={**GREEDY, "num_predict": 40})
    if anything.done_reason == "stop":           # else num_predict cut it: JSON so far
        assert isinstance(json.loads(anything.response), dict)
    assert anything.response.startswith("{")


def test_tool_call_and_result(client):
    """A tool call comes back with its arguments as an object; the result goes
    back as a `tool` message and the model answers."""
    # SmolLM2 never calls on its own; Ollama's API has no tool_choice, llmhost takes OpenAI's
    # as an extra (the client's chat() has no argument for it: its request, its types).
    reply = client._request(ollama.ChatResponse, "POST", "/api/chat", json={
        "model": "smollm2", "tools": [WEATHER], "tool_choice": "required", "stream": False,
        "options": {**GREEDY, "num_predict": 48},
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}]})
    calls = reply.message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    jsonschema.validate(dict(calls[0].function.arguments), WEATHER["function"]["parameters"])
    answer = client.chat(model="smollm2", tools=[WEATHER], options=GREEDY, messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_name": "get_weather", "content": "18 degrees and sunny"}])
    assert answer.message.content and not answer.message.tool_calls


def test_embed(client, server):
    out = client.embed(model="minilm", input=["a cat", "a dog"])
    assert len(out.embeddings) == 2 and len(out.embeddings[0]) == 384
    openai = requests.post(server.url + "/v1/embeddings", timeout=60,
                           json={"model": "minilm", "input": ["a cat", "a dog"]}).json()
    assert out.embeddings[1] == pytest.approx(openai["data"][1]["embedding"], abs=1e-6)
    assert out.prompt_eval_count == openai["usage"]["prompt_tokens"]
    old = client.embeddings(model="minilm", prompt="a cat")
    assert old.embedding == pytest.approx(out.embeddings[0], abs=1e-6)


def test_list_ps_show_version(client):
    names = [m.model for m in client.list().models]
    assert "smollm2" in names and "minilm" in names
    running = {m.model: m for m in client.ps().models}
    assert running["smollm2"].size > 0 and running["smollm2"].context_length > 0
    shown = client.show("smollm2")
    assert "completion" in shown.capabilities and "{%" in shown.template
    assert shown.details.family == "llama" and shown.details.format == "gguf"
    assert client.show("minilm").capabilities == ["embedding"]
    assert requests.get(client._client.base_url.join("/api/version")).json()["version"]


def test_pull_with_progress_then_delete(client, tiny_models):
    path = tiny_models["gpt2"]
    statuses = list(client.pull(path, stream=True))
    assert statuses[0].status == "pulling manifest" and statuses[-1].status == "success"
    assert path in [m.model for m in client.list().models]
    assert client.pull(path).status == "success"        # already loaded: same answer
    client.delete(path)
    assert path not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as gone:
        client.delete(path)
    assert gone.value.status_code == 404


def test_errors_are_response_errors(client):
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="no-such-model", messages=ASK)
    assert missing.value.status_code == 404 and "no-such-model" in missing.value.error
    with pytest.raises(ollama.ResponseError) as bad:
        client.chat(model="smollm2", messages=ASK, options={"num_predict": "many"})
    assert bad.value.status_code == 400 and "num_predict" in bad.value.error


def test_keys_and_error_shape(make_app, local_gpt2):
    app = make_app(API_KEYS=["sk-ollama-test"])
    web = app.test_client()
    r = web.get("/api/tags")
    assert r.status_code == 401 and set(r.json) == {"error"}
    r = web.get("/api/tags", headers={"Authorization": "Bearer sk-ollama-test"})
    assert r.status_code == 200 and local_gpt2 in [m["name"] for m in r.json["models"]]
    r = web.post("/api/chat", headers={"Authorization": "Bearer sk-ollama-test"},
                 json={"model": local_gpt2, "messages": ASK, "options": {"num_predict": 3}})
    assert r.status_code == 200 and r.mimetype == "application/x-ndjson"
    lines = [json.loads(line) for line in r.data.decode().splitlines()]
    assert lines[-1]["done"] is True and all(not line["done"] for line in lines[:-1])
    assert lines[-1]["eval_count"] == 3 and lines[-1]["done_reason"] == "length"
