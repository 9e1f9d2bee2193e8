"""Agent loops that end on small models (SmolLM2, whose template knows no
tools): with `parallel_tool_calls` left out a forced call is one call, forced
JSON is compact, and a call whose closing tag max_tokens cut is still a call
(finish_reason `length`), on chat, Responses and the Messages API."""
import json

import requests

from llmhost.generation.parsing import HERMES, OutputParser

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_a_cut_closing_tag_still_parses_the_call():
    parser = OutputParser(HERMES, "", [WEATHER])
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_'
    fed = [parser.feed(text[i:i + 7]) for i in range(0, len(text), 7)]
    done = parser.finish()
    assert not any(p.content for p in fed) and not done.content
    calls = [c for p in [*fed, done] for c in p.tool_calls]
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(c["function"].get("arguments", "") for c in calls)) == {"city": "Paris"}
    # Text that only looks like a tag's start is kept.
    plain = OutputParser(HERMES, "", [WEATHER])
    assert plain.feed("a < b <").content + plain.finish().content == "a < b <"


def _chat(server, **body):
    r = requests.post(server.url + "/v1/chat/completions", timeout=300, json={
        "model": "smollm2", "messages": ASK, "temperature": 0, "tools": [WEATHER],
        "tool_choice": "required", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_forced_call_is_one_compact_call_within_32_tokens(server, smollm2):
    """The issue's case: required, parallel_tool_calls left out, max_tokens 32."""
    body = _chat(server, max_tokens=32)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"])["city"]
    assert body["usage"]["completion_tokens"] <= 32
    responses = requests.post(server.url + "/v1/responses", timeout=300, json={
        "model": "smollm2", "input": ASK[0]["content"], "temperature": 0, "store": False,
        "max_output_tokens": 32, "tool_choice": "required",
        "tools": [{"type": "function", **WEATHER["function"]}]}).json()
    assert responses["status"] == "completed", responses
    assert [i["type"] for i in responses["output"]] == ["function_call"]
    message = requests.post(server.url + "/v1/messages", timeout=300, json={
        "model": "smollm2", "max_tokens": 32, "temperature": 0, "messages": ASK,
        "tool_choice": {"type": "any"},
        "tools": [{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}]}).json()
    assert message["stop_reason"] == "tool_use"
    assert [b["type"] for b in message["content"]] == ["tool_use"]


def test_call_cut_in_its_closing_tag_is_returned(server, smollm2):
    whole = _chat(server, max_tokens=64)
    used = whole["usage"]["completion_tokens"]
    cut = _chat(server, max_tokens=used - 2)["choices"][0]
    assert cut["finish_reason"] == "length"
    assert cut["message"]["tool_calls"][0]["function"] == \
        whole["choices"][0]["message"]["tool_calls"][0]["function"]
    assert cut["message"]["content"] is None
