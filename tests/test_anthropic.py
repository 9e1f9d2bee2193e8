"""Anthropic's Messages API with the official `anthropic` SDK: create, the
SDK's stream helper and its accumulated final message, a tool-use round trip,
forced tool_choice, count_tokens, stop sequences, and errors raised as the
SDK's typed exceptions. Every body and event is validated against the SDK's
own (pydantic) types. SmolLM2 in the shared server where a real model's
behaviour matters; keys and error shapes on an in-process app (the SDK over
httpx's WSGI transport, no server)."""
import importlib
import json

import anthropic
import jsonschema
import pytest
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from pydantic import TypeAdapter

WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "input_schema": {"type": "object", "properties": {
               "city": {"type": "string", "maxLength": 20},
               "unit": {"enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": "Current time in a time zone.",
        "input_schema": {"type": "object", "properties": {"zone": {"type": "string",
                                                                   "maxLength": 10}},
                         "required": ["zone"], "additionalProperties": False}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
EVENT = TypeAdapter(RawMessageStreamEvent)
# Greedy. Current SDKs no longer take `temperature` as an argument; the API does.
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def claude(server, smollm2):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=300)


def _valid(message) -> Message:
    """The body validated by the SDK's own model (strict pydantic validation,
    not the SDK's lenient construct)."""
    return Message.model_validate(message.model_dump(mode="json"))


def test_create_answers_a_message(claude):
    message = _valid(claude.messages.create(
        model="smollm2", max_tokens=24, **GREEDY, system="Answer briefly.",
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}]))
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "smollm2"
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.content and message.content[0].type == "text" and message.content[0].text
    usage = message.usage     # prompt tokens read from the prefix cache are counted apart
    assert usage.input_tokens + usage.cache_read_input_tokens > 10
    assert 0 < usage.output_tokens <= 24 and usage.cache_read_input_tokens >= 0


def test_stream_helper_accumulates_the_same_message(claude):
    """The SDK's messages.stream() over our events gives the message the plain
    request gives (greedy), and every raw event validates as the SDK's type."""
    body = {"model": "smollm2", "max_tokens": 20, "messages": ASK, **GREEDY}
    plain = claude.messages.create(**body)
    with claude.messages.stream(**body) as stream:
        streamed_text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed_text == plain.content[0].text == final.content[0].text
    assert final.stop_reason == plain.stop_reason and final.usage.output_tokens == \
        plain.usage.output_tokens
    raw = list(claude.messages.create(**body, stream=True))
    kinds = [EVENT.validate_python(e.model_dump(mode="json")).type for e in raw]
    assert kinds[:2] == ["message_start", "content_block_start"]   # the SDK drops `ping`
    assert kinds[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]


def test_forced_tool_use_round_trip(claude):
    """tool_choice any: a tool_use block whose input follows the schema
    (grammar), stop_reason tool_use; the result goes back as tool_result and
    the model answers."""
    first = _valid(claude.messages.create(
        model="smollm2", max_tokens=64, **GREEDY, messages=ASK, tools=[WEATHER, TIME],
        tool_choice={"type": "any", "disable_parallel_tool_use": True}))
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].id
    schema = {t["name"]: t["input_schema"] for t in (WEATHER, TIME)}[uses[0].name]
    jsonschema.validate(uses[0].input, schema)
    second = _valid(claude.messages.create(
        model="smollm2", max_tokens=24, **GREEDY, tools=[WEATHER, TIME],
        messages=[*ASK, {"role": "assistant", "content": first.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                                "content": "18 degrees, sunny"}]}]))
    assert second.stop_reason in ("end_turn", "max_tokens")
    assert second.content[0].type == "text" and second.content[0].text


def test_named_tool_streamed_input_json(claude):
    """tool_choice tool: that function, streamed as input_json_delta pieces the
    SDK's accumulator turns back into the input object."""
    body = {"model": "smollm2", "max_tokens": 48, **GREEDY, "tools": [WEATHER, TIME],
            "messages": [{"role": "user", "content": "Time in Tokyo?"}],
            "tool_choice": {"type": "tool", "name": "get_time"}}
    events = [EVENT.validate_python(e.model_dump(mode="json"))
              for e in claude.messages.create(**body, stream=True)]
    with claude.messages.stream(**body) as stream:
        final = stream.get_final_message()
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta"
               for e in events)
    assert final.stop_reason == "tool_use"
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert use.name == "get_time"
    jsonschema.validate(use.input, TIME["input_schema"])


def test_count_tokens_matches_the_run(claude):
    body = {"model": "smollm2", "messages": ASK, "system": [{"type": "text", "text": "Be brief.",
                                                             "cache_control": {"type": "ephemeral"}}]}
    counted = claude.messages.count_tokens(**body)
    MessageTokensCount.model_validate(counted.model_dump())
    ran = claude.messages.create(**body, max_tokens=1)
    assert counted.input_tokens == ran.usage.input_tokens + ran.usage.cache_read_input_tokens
    with_tools = claude.messages.count_tokens(**body, tools=[WEATHER])
    assert with_tools.input_tokens > counted.input_tokens + 20


def test_stop_sequence_is_named(claude):
    body = {"model": "smollm2", "max_tokens": 30, **GREEDY,
            "messages": [{"role": "user", "content": "Name three colours."}]}
    text = claude.messages.create(**body).content[0].text
    words = text.split()
    assert len(words) > 3, text
    stop = words[2]
    cut = claude.messages.create(**body, stop_sequences=[stop, "zzqx"])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert stop not in (cut.content[0].text if cut.content else "")


def test_errors_are_the_sdks_typed_exceptions(claude):
    with pytest.raises(anthropic.NotFoundError) as found:
        claude.messages.create(model="no-such-model", max_tokens=5, messages=ASK)
    assert found.value.body["type"] == "error"
    assert found.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model="smollm2", max_tokens=5, messages=ASK,
                               extra_body={"temperature": 1.5})
    assert "temperature" in bad.value.message
    with pytest.raises(anthropic.BadRequestError) as image:
        claude.messages.create(model="smollm2", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AAAA"}}]}])
    # images reach vision-language models only; a text model names the block and what to load
    assert "messages[0].content[0]" in image.value.message
    assert "vision-language model" in image.value.message
    with pytest.raises(anthropic.BadRequestError):   # max_tokens is required, as Anthropic's
        claude.post("/v1/messages", cast_to=Message, body={"model": "smollm2", "messages": ASK})
    with pytest.raises(anthropic.BadRequestError) as builtin:
        claude.messages.create(model="smollm2", max_tokens=5, messages=ASK,
                               tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert "tools[0].type" in builtin.value.message


# -- keys and headers, on an in-process app -------------------------------------------

KEY = "sk-anthropic-test-5e1f"


@pytest.fixture()
def keyed(make_app, local_gpt2):
    # The SDK's own HTTP library (httpx2 in current SDKs) over WSGI: no server.
    base = anthropic._base_client
    httpx = getattr(base, "httpx2", None) or importlib.import_module("httpx")
    app = make_app(API_KEYS=[KEY])

    def client(**kwargs):
        return anthropic.Anthropic(base_url="http://llmhost", max_retries=0,
                                   http_client=httpx.Client(transport=httpx.WSGITransport(app=app)),
                                   **kwargs)
    return client


def test_keys_as_x_api_key_or_bearer_and_any_version(keyed, local_gpt2):
    body = {"model": local_gpt2, "messages": ASK}
    assert keyed(api_key=KEY).messages.count_tokens(**body).input_tokens > 0
    assert keyed(auth_token=KEY).messages.count_tokens(**body).input_tokens > 0
    future = keyed(api_key=KEY, default_headers={"anthropic-version": "2099-12-31",
                                                 "anthropic-beta": "whatever-2099"})
    assert future.messages.count_tokens(**body).input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError) as wrong:
        keyed(api_key="sk-wrong").messages.count_tokens(**body)
    assert wrong.value.body == {"type": "error", "error": {
        "type": "authentication_error", "message": "Incorrect API key provided."}}
    with pytest.raises(anthropic.AuthenticationError):
        keyed(api_key="").messages.create(max_tokens=5, **body)


def test_openai_routes_keep_openai_envelope(keyed, make_app):
    """The envelope is the route's API: the same bad key on /v1/models is OpenAI's."""
    app = make_app(API_KEYS=[KEY])
    r = app.test_client().get("/v1/models", headers={"x-api-key": "sk-wrong"})
    assert r.status_code == 401 and r.json["error"]["code"] == "invalid_api_key"
    r = app.test_client().get("/v1/models", headers={"x-api-key": KEY})
    assert r.status_code == 200


def test_event_stream_framing(make_app, local_gpt2):
    """Named events (event: <type>), no [DONE]; an unknown model before the
    stream is a plain 404 in Anthropic's envelope."""
    client = make_app().test_client()
    r = client.post("/v1/messages", json={"model": local_gpt2, "max_tokens": 4, "stream": True,
                                          "messages": ASK})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = [e for e in r.data.decode().split("\n\n") if e]
    assert "[DONE]" not in r.data.decode()
    for event in events:
        name, data = event.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert name == f"event: {payload['type']}"
        if payload["type"] != "ping":     # not one of the SDK's event types: it skips pings
            EVENT.validate_python(payload)
    assert [json.loads(e.split("data: ")[1])["type"] for e in events[:2]] == \
        ["message_start", "ping"]
    r = client.post("/v1/messages", json={"model": "nope", "max_tokens": 4, "stream": True,
                                          "messages": ASK})
    assert r.status_code == 404 and r.json["error"]["type"] == "not_found_error"
