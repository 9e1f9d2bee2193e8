"""POST /v1/responses end to end through gunicorn and the official openai
client: the same generation as chat (SmolLM2), the event stream, stored
conversations, token counting, bad input, and tools and structured output
through the chat layer's tool calling (generation/tools.py)."""
import json
import re
import socket
import time

import openai
import pytest
import requests
from pydantic import BaseModel

from genutil import post
from support import assert_error, validate

ASK = "What is the capital of France?"
SYSTEM = "You are a terse geography assistant."


def _dump(response) -> dict:
    # by_alias: the wire names (the SDK's model calls text.format's `schema` `schema_`)
    return validate(response.model_dump(mode="json", exclude_unset=True, by_alias=True),
                    "Response")


def _chat(server, messages: list[dict], max_tokens: int, model: str = "smollm2") -> dict:
    r = post(server, "/v1/chat/completions", {"model": model, "messages": messages,
                                               "temperature": 0, "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()


TINY = "resp-tiny-llama"


@pytest.fixture(scope="module", autouse=True)
def tiny_llama(server, tiny_models):
    """Most tests run on the tiny Llama (fast); SmolLM2 shows the real thing."""
    server.load(tiny_models["llama"], id=TINY)
    return TINY


@pytest.fixture(scope="module")
def first(openai_client, smollm2):
    """One greedy response with instructions, asked once."""
    return openai_client.responses.create(model="smollm2", input=ASK, instructions=SYSTEM,
                                          temperature=0, max_output_tokens=12)


# -- one generation path with chat -------------------------------------------------

def test_create_equals_the_same_chat_request(server, first):
    body = _dump(first)
    chat = _chat(server, [{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": ASK}], 12)
    assert first.output_text == chat["choices"][0]["message"]["content"] and first.output_text
    assert body["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert body["usage"]["output_tokens"] == chat["usage"]["completion_tokens"]
    assert body["usage"]["total_tokens"] == chat["usage"]["total_tokens"]
    assert first.id.startswith("resp_") and first.object == "response"
    assert first.instructions == SYSTEM and first.model == "smollm2"
    [message] = first.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    if chat["choices"][0]["finish_reason"] == "length":
        assert first.status == "incomplete"
        assert first.incomplete_details.reason == "max_output_tokens"
    else:
        assert first.status == "completed" and first.incomplete_details is None


def test_plain_string_input(openai_client, server):
    r = openai_client.responses.create(model=TINY, input="Say hello.", temperature=0,
                                       max_output_tokens=6)
    _dump(r)
    chat = _chat(server, [{"role": "user", "content": "Say hello."}], 6, TINY)
    assert r.output_text == chat["choices"][0]["message"]["content"]
    assert r.usage.input_tokens == chat["usage"]["prompt_tokens"]


def test_cut_by_max_output_tokens_is_incomplete(openai_client):
    r = openai_client.responses.create(model=TINY, input="Write a long poem about the sea.",
                                       temperature=0, max_output_tokens=3)
    _dump(r)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"


# -- streaming ---------------------------------------------------------------------

def _raw_stream(server, body: dict) -> list[dict]:
    """POST with stream: true; every event is `event: <type>` + `data: <json>`,
    `type` equal to the event name, sequence numbers 0, 1, 2, ...; no [DONE]."""
    r = requests.post(server.url + "/v1/responses", json={**body, "stream": True}, stream=True,
                      timeout=300)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/event-stream")
    raw = r.content.decode("utf-8")
    blocks = raw.split("\n\n")
    assert blocks[-1] == "" and "[DONE]" not in raw
    events = []
    for block in blocks[:-1]:
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        event = json.loads(data_line[len("data: "):])
        assert event["type"] == name_line[len("event: "):]
        validate(event, "ResponseStreamEvent")
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_stream_event_sequence_equals_the_body(server, first):
    events = _raw_stream(server, {"model": "smollm2", "input": ASK, "instructions": SYSTEM,
                                  "temperature": 0, "max_output_tokens": 12})
    types = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    final = "response.completed" if first.status == "completed" else "response.incomplete"
    assert types == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * len(deltas)
                     + ["response.output_text.done", "response.content_part.done",
                        "response.output_item.done", final])
    created = events[0]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    item_id = events[2]["item"]["id"]
    assert all(e["item_id"] == item_id for e in deltas)
    text = "".join(e["delta"] for e in deltas)
    assert text == first.output_text == events[-4]["text"]
    done = events[-1]["response"]
    assert done["id"] == created["id"] and done["status"] == first.status
    assert done["output"][0]["id"] == item_id and done["output_text"] == text
    assert done["usage"] == first.usage.model_dump(mode="json", exclude_unset=True)


def test_sdk_stream(openai_client, first):
    with openai_client.responses.stream(model="smollm2", input=ASK, instructions=SYSTEM,
                                        temperature=0, max_output_tokens=12) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text == first.output_text
    _dump(final)
    # Stored, as a non-streamed one.
    assert openai_client.responses.retrieve(final.id).output_text == text


def test_client_gone_cancels_the_stream_and_the_stored_response_says_so(server, smollm2):
    pattern = r"cancelled a smollm2 request after (\d+) generated tokens"
    before = len(re.findall(pattern, server.log()))
    body = json.dumps({"model": "smollm2", "input": "Write a long story about a dragon.",
                       "max_output_tokens": 200, "temperature": 0, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while b"response.output_text.delta" not in received:
            received += sock.recv(4096)
    response_id = re.search(rb'"id":"(resp_[0-9a-f]+)"', received).group(1).decode()
    deadline = time.monotonic() + 30
    while len(re.findall(pattern, server.log())) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    found = re.findall(pattern, server.log())
    assert len(found) > before and int(found[-1]) < 100, server.log()[-2000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stored = requests.get(f"{server.url}/v1/responses/{response_id}", timeout=30).json()
        if stored["status"] != "in_progress":
            break
        time.sleep(0.2)
    assert stored["status"] == "cancelled"
    validate(stored, "Response")


# -- stored conversations -----------------------------------------------------------

def test_previous_response_id_across_three_turns(openai_client, server):
    turns = ["My name is Ada.", "I live in Paris.", "What is my name?"]
    previous, responses = None, []
    for text in turns:
        r = openai_client.responses.create(model=TINY, input=text, temperature=0,
                                           max_output_tokens=5, previous_response_id=previous)
        _dump(r)
        responses.append(r)
        previous = r.id
    # The model saw the whole conversation: the same prompt as the chat request.
    messages = []
    for text, r in zip(turns, responses):
        messages.append({"role": "user", "content": text})
        if r is not responses[-1]:
            messages.append({"role": "assistant", "content": r.output_text})
    chat = _chat(server, messages, 5, TINY)
    assert responses[-1].usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert responses[-1].output_text == chat["choices"][0]["message"]["content"]
    assert responses[-1].previous_response_id == responses[1].id
    # Its input items: the conversation, oldest first with order=asc.
    items = openai_client.responses.input_items.list(responses[-1].id, order="asc", limit=100)
    validate(items.model_dump(mode="json", exclude_unset=True), "ResponseItemList")
    got = [(i.role, i.content[0].text) for i in items.data]
    assert got == [(m["role"], m["content"]) for m in messages]
    assert [i.id for i in items.data][1] == responses[0].output[0].id
    # Retrieved as created.
    again = openai_client.responses.retrieve(responses[-1].id)
    assert _dump(again) == _dump(responses[-1])


def test_input_items_pagination(openai_client):
    conversation = [{"role": "user", "content": f"Item {i}."} for i in range(5)]
    r = openai_client.responses.create(model=TINY, input=conversation, temperature=0,
                                       max_output_tokens=1)
    everything = openai_client.responses.input_items.list(r.id, limit=100)
    assert [i.content[0].text for i in everything.data] == [f"Item {i}." for i in range(4, -1, -1)]
    page = openai_client.responses.input_items.list(r.id, limit=2, order="asc")
    body = validate(page.model_dump(mode="json", exclude_unset=True), "ResponseItemList")
    assert body["has_more"] is True and [i["content"][0]["text"] for i in body["data"]] == \
        ["Item 0.", "Item 1."]
    assert body["first_id"] == body["data"][0]["id"] and body["last_id"] == body["data"][1]["id"]
    rest = openai_client.responses.input_items.list(r.id, limit=2, order="asc",
                                                    after=body["last_id"])
    assert [i.content[0].text for i in rest.data] == ["Item 2.", "Item 3."] and rest.has_more
    # The SDK's auto-pagination walks every page.
    walked = [i.content[0].text for i in
              openai_client.responses.input_items.list(r.id, limit=2, order="asc")]
    assert walked == [f"Item {i}." for i in range(5)]


def test_delete_and_store_false(openai_client, server):
    r = openai_client.responses.create(model=TINY, input="Hi", max_output_tokens=1)
    assert openai_client.responses.delete(r.id) is None
    for call in (lambda: openai_client.responses.retrieve(r.id),
                 lambda: openai_client.responses.delete(r.id),
                 lambda: openai_client.responses.input_items.list(r.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    gone = post(server, "/v1/responses", {"model": TINY, "input": "Again",
                                          "previous_response_id": r.id})
    assert_error(gone, 404, "previous_response_id")
    unstored = openai_client.responses.create(model=TINY, input="Hi", max_output_tokens=1,
                                              store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(unstored.id)


# -- token counting -------------------------------------------------------------------

def test_counts_equal_usage(openai_client, server, smollm2):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}]
    chat = _chat(server, messages, 1)
    for path in ("/tokenize", "/v1/tokenize"):
        r = post(server, path, {"model": "smollm2", "messages": messages})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["count"] == len(body["tokens"]) == chat["usage"]["prompt_tokens"]
        assert body["max_model_len"] > body["count"]
    counted = openai_client.responses.input_tokens.count(model="smollm2", input=ASK,
                                                         instructions=SYSTEM)
    validate(counted.model_dump(mode="json"), "TokenCountsResource")
    assert counted.input_tokens == chat["usage"]["prompt_tokens"]
    # Text prompts: as /v1/completions counts them; and back again.
    completion = post(server, "/v1/completions", {"model": "smollm2", "prompt": "Once upon a time",
                                                  "max_tokens": 1}).json()
    tokens = post(server, "/tokenize", {"model": "smollm2", "prompt": "Once upon a time",
                                        "return_token_strs": True}).json()
    assert tokens["count"] == completion["usage"]["prompt_tokens"]
    assert len(tokens["token_strs"]) == tokens["count"]
    for path in ("/detokenize", "/v1/detokenize"):
        back = post(server, path, {"model": "smollm2", "tokens": tokens["tokens"]})
        assert back.status_code == 200 and back.json() == {"prompt": "Once upon a time"}


def test_routes_are_in_the_openapi_document(server):
    paths = requests.get(server.url + "/openapi.json", timeout=30).json()["paths"]
    for path in ("/v1/responses", "/v1/responses/{response_id}",
                 "/v1/responses/{response_id}/input_items", "/v1/responses/input_tokens",
                 "/tokenize", "/v1/tokenize", "/detokenize", "/v1/detokenize"):
        assert path in paths, path


# -- bad input -----------------------------------------------------------------------

BAD = [
    ({"input": [{"type": "file_search_call", "id": "x"}]}, 400, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     400, "input[0].content[0].image_url"),
    ({"input": [{"type": "function_call_output", "call_id": "call_1", "output": "42"}]},
     400, "input[0].call_id"),
    ({"input": "Hi", "previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"input": "Hi", "tools": [{"type": "function", "name": "f"}, {"type": "mcp"}]}, 400,
     "tools[1].type"),
    ({"input": "Hi", "background": True}, 400, "background"),
    ({"input": "Hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "Hi", "max_output_tokens": 10 ** 6}, 400, "max_output_tokens"),
    ({"input": "Hi", "text": {"format": {"type": "yaml"}}}, 400, "text.format.type"),
    ({"input": 42}, 400, "input"),
    ({"input": "Hi", "model": "no-such-model"}, 404, "__any__"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_input(server, body, status, param):
    r = post(server, "/v1/responses", {"model": TINY, **body})
    message = assert_error(r, status, param)["message"]
    if "tools" in body and status == 400:
        assert body["tools"][-1]["type"] in message


def test_bad_pagination_and_token_requests(openai_client, server):
    r = openai_client.responses.create(model=TINY, input="Hi", max_output_tokens=1)
    url = f"{server.url}/v1/responses/{r.id}/input_items"
    assert_error(requests.get(url, params={"after": "msg_nope"}, timeout=30), 400, "after")
    assert_error(requests.get(url, params={"limit": 0}, timeout=30), 400, "limit")
    assert_error(requests.get(url, params={"order": "up"}, timeout=30), 400, "order")
    assert_error(post(server, "/tokenize", {"model": TINY}), 400, "prompt")
    assert_error(post(server, "/tokenize", {"model": TINY, "prompt": "a", "messages": [
        {"role": "user", "content": "b"}]}), 400, "prompt")
    assert_error(post(server, "/detokenize", {"model": TINY, "tokens": [10 ** 9]}), 400,
                 "tokens[0]")


def test_agents_sdk_answers_and_continues(server, openai_client, smollm2):
    """The OpenAI Agents SDK's default model class (OpenAIResponsesModel) runs
    against llmhost: the same answer as the chat route, and a second run
    continues the first through previous_response_id. (The SDK treats an
    `incomplete` response as an error, so the answers must end by themselves.)"""
    from agents import (Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner,
                        set_tracing_disabled)

    set_tracing_disabled(True)     # no trace export: nothing leaves this machine
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    agent = Agent(name="plain", instructions="Answer in one word.",
                  model=OpenAIResponsesModel(model="smollm2", openai_client=client),
                  model_settings=ModelSettings(temperature=0, max_tokens=16))
    config = RunConfig(tracing_disabled=True)
    result = Runner.run_sync(agent, ASK, run_config=config)
    chat = _chat(server, [{"role": "system", "content": "Answer in one word."},
                          {"role": "user", "content": ASK}], 16)
    assert result.final_output == chat["choices"][0]["message"]["content"]
    again = Runner.run_sync(agent, "And of Italy?", run_config=config,
                            previous_response_id=result.last_response_id)
    assert again.final_output
    items = openai_client.responses.input_items.list(again.last_response_id, order="asc")
    assert [(i.role, i.content[0].text) for i in items.data] == [
        ("user", ASK), ("assistant", result.final_output), ("user", "And of Italy?")]


# -- tools and structured output (the chat layer's tool calling) ---------------------

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
           "strict": True, "parameters": {"type": "object", "additionalProperties": False,
                                          "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}


def test_function_tool_round_trip(openai_client, smollm2):
    r = openai_client.responses.create(
        model="smollm2", input="What is the weather in Paris?", tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
        max_output_tokens=40)
    _dump(r)
    [call] = [item for item in r.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and call.status == "completed"
    assert isinstance(json.loads(call.arguments)["city"], str)
    answer = openai_client.responses.create(
        model="smollm2", previous_response_id=r.id, tools=[WEATHER], temperature=0,
        max_output_tokens=12, tool_choice="none",
        input=[{"type": "function_call_output", "call_id": call.call_id,
                "output": json.dumps({"forecast": "sunny, 21 C"})}])
    _dump(answer)
    assert answer.output_text and answer.output[-1].type == "message"
    items = openai_client.responses.input_items.list(answer.id, order="asc")
    types = [i.type for i in items.data]
    assert types[0] == "message" and types[-2:] == ["function_call", "function_call_output"]


def test_streamed_function_call_events(server, smollm2):
    events = _raw_stream(server, {"model": "smollm2", "input": "Weather in Rome?",
                                  "tools": [WEATHER], "temperature": 0, "max_output_tokens": 40,
                                  "tool_choice": {"type": "function", "name": "get_weather"}})
    added = [e for e in events if e["type"] == "response.output_item.added"
             and e["item"]["type"] == "function_call"]
    assert len(added) == 1 and added[0]["item"]["name"] == "get_weather"
    item_id = added[0]["item"]["id"]
    pieces = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done["item_id"] == item_id and done["arguments"] == "".join(pieces)
    assert json.loads(done["arguments"])["city"]
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    assert [o for o in final["output"] if o["type"] == "function_call"][0]["arguments"] == \
        done["arguments"]


class City(BaseModel):
    name: str
    country: str


def test_parse_text_format(openai_client, smollm2):
    r = openai_client.responses.parse(model="smollm2", input="Name a city in Italy.",
                                      text_format=City, temperature=0, max_output_tokens=40)
    _dump(r)
    assert isinstance(r.output_parsed, City) and r.output_parsed.name


def test_agents_sdk_runs_a_tool(server, smollm2):
    from agents import (Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner,
                        function_tool, set_tracing_disabled)

    set_tracing_disabled(True)     # no trace export: nothing leaves this machine
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 C in {city}."

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    agent = Agent(name="weather", instructions="Answer with the weather tool's result.",
                  tools=[get_weather],
                  model=OpenAIResponsesModel(model="smollm2", openai_client=client),
                  # The first turn must call the tool, once (a forced grammar with parallel
                  # calls lets a 135M model repeat its call until max_tokens); the SDK then
                  # resets tool_choice (reset_tool_choice) so the next turn answers.
                  model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                               temperature=0, max_tokens=60))
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4,
                             run_config=RunConfig(tracing_disabled=True))
    assert calls == ["Paris"], calls
    first, last = result.raw_responses[0], result.raw_responses[-1]
    assert [o.type for o in first.output if o.type == "function_call"] == ["function_call"]
    assert len(result.raw_responses) == 2        # the call, then the answer in text
    assert isinstance(result.final_output, str) and result.final_output.strip()
    assert not [o for o in last.output if o.type == "function_call"]
    assert result.final_output == "".join(
        part.text for o in last.output if o.type == "message" for part in o.content)
