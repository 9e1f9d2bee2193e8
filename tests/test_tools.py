"""Tool calling and reasoning on /v1/chat/completions: SmolLM2 (no tool
template: llmhost's fallback turn, calls forced by the grammar), a tiny random
Qwen2 with a Qwen2.5-style tool template (transformers' Qwen response
template parses its output; structured_outputs regex drives it), and the
bad-input 400s."""
import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from genutil import post, sse
from support import assert_error, validate

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def chat(server, **body) -> dict:
    r = post(server, "/v1/chat/completions", {"model": "smollm2", "messages": ASK,
                                              "temperature": 0, "max_tokens": 48, **body})
    assert r.status_code == 200, r.text
    return validate(r.json(), "CreateChatCompletionResponse")


def check_calls(calls: list[dict], names=None) -> None:
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        assert name in (names or PARAMS)
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS[name])


def reassemble(chunks: list[dict]) -> tuple[str, list[dict], str, str]:
    """(content, tool calls, reasoning, finish_reason) of choice 0 from chunks,
    checking the delta order OpenAI clients rely on."""
    content, reasoning, reason = "", "", None
    calls: list[dict] = []
    for chunk in chunks:
        for c in chunk["choices"]:
            d = c["delta"]
            content += d.get("content") or ""
            reasoning += d.get("reasoning_content") or ""
            for tc in d.get("tool_calls") or []:
                if tc["index"] == len(calls):          # a new call starts with id/type/name
                    assert tc["id"] and tc["type"] == "function" and tc["function"]["name"]
                    calls.append({"id": tc["id"], "type": "function",
                                  "function": {"name": tc["function"]["name"], "arguments": ""}})
                else:
                    assert "id" not in tc and tc["index"] == len(calls) - 1
                calls[tc["index"]]["function"]["arguments"] += tc["function"].get("arguments", "")
            reason = c["finish_reason"] or reason
    return content, calls, reasoning, reason


# -- SmolLM2: a model never trained for tools -----------------------------------------

def test_required_gives_valid_calls(server, smollm2):
    choice = chat(server, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  max_tokens=64)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert len(choice["message"]["tool_calls"]) == 1
    check_calls(choice["message"]["tool_calls"])


def test_required_parallel_ends_at_the_first_repeated_call(server, smollm2):
    """Under the parallel call grammar SmolLM2 writes the same call again and
    again; the repeat ends the answer (generation/callguard.py): tool_calls, no
    two identical calls, far fewer tokens than max_tokens. Streamed and not,
    n=2."""
    body = {"model": "smollm2", "messages": ASK, "temperature": 0, "max_tokens": 300, "n": 2,
            "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": True}
    full = chat(server, **{k: v for k, v in body.items() if k not in ("model", "messages")})
    assert full["usage"]["completion_tokens"] < 2 * 150, full["usage"]
    for choice in full["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        calls = choice["message"]["tool_calls"]
        check_calls(calls)
        keys = [(c["function"]["name"], json.dumps(json.loads(c["function"]["arguments"]),
                                                   sort_keys=True)) for c in calls]
        assert len(keys) == len(set(keys)), keys
    _, chunks = sse(server, "/v1/chat/completions", {**body, "n": 1},
                    "CreateChatCompletionStreamResponse")
    content, streamed, _, reason = reassemble(chunks)
    expected = full["choices"][0]["message"]["tool_calls"]
    assert reason == "tool_calls" and not content
    assert [c["function"] for c in streamed] == [c["function"] for c in expected]


def test_call_guard_drops_repeats_and_calls_over_the_limit():
    from llmhost.generation.callguard import CallGuard
    from llmhost.generation.parsing import join_calls

    def call(index, name, args):
        return [{"index": index, "id": f"call_{index}", "type": "function",
                 "function": {"name": name, "arguments": ""}},
                {"index": index, "function": {"arguments": args[:5]}},
                {"index": index, "function": {"arguments": args[5:]}}]

    guard = CallGuard()
    first = call(0, "f", '{"a": 1, "b": 2}')
    assert guard.check(first) == (first, False)
    assert guard.check(call(1, "g", '{"a": 1, "b": 2}'))[1] is False      # another function
    assert guard.check(call(2, "f", '{"b":2,"a":1}')) == ([], True)        # same JSON value
    limited = CallGuard(limit=2)
    sent, end = limited.check(call(0, "f", '{"x": 1}') + call(1, "f", '{"x": 2}')
                              + call(2, "f", '{"x": 3}'))
    assert end and [c["function"]["arguments"] for c in join_calls([], sent)] == \
        ['{"x": 1}', '{"x": 2}']
    # A call whose arguments come over several parser releases is judged whole.
    streamed = CallGuard()
    assert streamed.check(call(0, "f", '{"a": 1}')) == (call(0, "f", '{"a": 1}'), False)
    second = call(1, "f", '{"a": 2}')
    assert streamed.check(second[:2]) == ([], False)         # '{"a":' is not whole yet
    assert streamed.check(second[2:]) == (second, False)
    again = call(2, "f", '{"a": 2}')
    assert streamed.check(again[:2]) == ([], False)
    assert streamed.check(again[2:]) == ([], True)          # a repeat, once whole
    cut = CallGuard()                                         # max_tokens cut a call: sent as is
    assert cut.check(second[:2], final=True) == (second[:2], False)


def test_named_function_is_called(server, smollm2):
    choice = chat(server, tools=TOOLS, tool_choice={"type": "function",
                                                    "function": {"name": "get_time"}})["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_time"
    check_calls(calls)


def test_streamed_call_equals_non_streamed(server, smollm2):
    body = {"model": "smollm2", "messages": ASK, "temperature": 0, "max_tokens": 48,
            "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    full = chat(server, **{k: v for k, v in body.items() if k not in ("model", "messages")})
    _, chunks = sse(server, "/v1/chat/completions", body, "CreateChatCompletionStreamResponse")
    content, calls, _, reason = reassemble(chunks)
    expected = full["choices"][0]["message"]["tool_calls"]
    assert reason == "tool_calls" and content == ""
    assert len(calls) == len(expected) == 1
    # Same call (ids are fresh per response).
    assert [c["function"] for c in calls] == [c["function"] for c in expected]
    pieces = [tc for ch in chunks for c in ch["choices"] for tc in c["delta"].get("tool_calls", [])]
    assert len(pieces) > 2     # id/name first, then the arguments in pieces


def test_tool_choice_none_answers_text(server, smollm2):
    choice = chat(server, tools=TOOLS, tool_choice="none", max_tokens=16)["choices"][0]
    assert "tool_calls" not in choice["message"]
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"]


def test_two_turn_loop_with_the_sdk(openai_client, smollm2):
    messages = list(ASK)
    first = openai_client.chat.completions.create(
        model="smollm2", messages=messages, tools=TOOLS, tool_choice="required",
        temperature=0, max_tokens=48)
    validate(first.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    call = first.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"city": args.get("city"), "temperature": 21})})
    second = openai_client.chat.completions.create(
        model="smollm2", messages=messages, tools=TOOLS, temperature=0, max_tokens=24)
    choice = second.choices[0]
    # The tool result reached the prompt, and the model answered (text or another valid call).
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    if choice.finish_reason == "tool_calls":
        check_calls([c.model_dump() for c in choice.message.tool_calls])
    else:
        assert choice.message.content


def test_tools_and_response_format_together(server, smollm2):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 30}},
              "required": ["answer"], "additionalProperties": False}
    full = chat(server, tools=TOOLS, max_tokens=64, parallel_tool_calls=False, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    for choice in full["choices"]:
        if choice["finish_reason"] == "tool_calls":
            check_calls(choice["message"]["tool_calls"])
        else:
            assert choice["finish_reason"] == "stop", choice
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_deprecated_functions(server, smollm2):
    choice = chat(server, functions=[TIME["function"]],
                  function_call={"name": "get_time"})["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"]["name"] == "get_time"
    jsonschema.validate(json.loads(choice["message"]["function_call"]["arguments"]),
                        PARAMS["get_time"])


# -- a tiny Qwen2 with a tool-aware template: the model's own format ---------------

CALLS = ('<tool_call>\\n\\{"name": "get_weather", "arguments": \\{"city": "Paris", '
         '"unit": "celsius"\\}\\}\\n</tool_call>\\n<tool_call>\\n\\{"name": "get_time", '
         '"arguments": \\{"zone": "CET"\\}\\}\\n</tool_call>')


@pytest.fixture(scope="module")
def qwen(server, tmp_path_factory):
    from llmhost.dev.tinymodels import build_qwen2_tools

    path = build_qwen2_tools(str(tmp_path_factory.mktemp("qwen") / "tiny-qwen2"))
    server.load(path, id="tiny-qwen2")
    return "tiny-qwen2"


def qwen_body(**body) -> dict:
    return {"model": "tiny-qwen2", "messages": ASK, "temperature": 0, "max_tokens": 200,
            "tools": TOOLS, **body}


def test_qwen_auto_parses_two_parallel_calls(server, qwen):
    body = qwen_body(structured_outputs={"regex": CALLS})
    r = post(server, "/v1/chat/completions", body)
    choice = validate(r.json(), "CreateChatCompletionResponse")["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert json.loads(calls[1]["function"]["arguments"]) == {"zone": "CET"}
    assert not choice["message"]["content"]
    _, chunks = sse(server, "/v1/chat/completions", body, "CreateChatCompletionStreamResponse")
    content, streamed, _, reason = reassemble(chunks)
    assert reason == "tool_calls" and not content.strip()
    assert [c["function"] for c in streamed] == [c["function"] for c in calls]


def test_max_tool_calls_setting_bounds_the_calls(make_app, tmp_path):
    """LLMHOST_MAX_TOOL_CALLS=1 (an app in this process): of the two different
    calls the regex makes the model write, the first is returned and the
    choice ends there, streamed or not."""
    from llmhost.dev.tinymodels import build_qwen2_tools
    from support import load_local

    client = make_app(MAX_TOOL_CALLS=1).test_client()
    load_local(build_qwen2_tools(str(tmp_path / "tiny-qwen2")), "calls-qwen2")
    body = qwen_body(model="calls-qwen2", structured_outputs={"regex": CALLS})
    out = client.post("/v1/chat/completions", json=body).get_json()
    choice = validate(out, "CreateChatCompletionResponse")["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather"]
    raw = client.post("/v1/chat/completions", json={**body, "stream": True}).get_data(as_text=True)
    chunks = [json.loads(e[len("data: "):]) for e in raw.split("\n\n")
              if e.startswith("data: {")]
    _, calls, _, reason = reassemble(chunks)
    assert reason == "tool_calls"
    expected = choice["message"]["tool_calls"]
    assert [c["function"] for c in calls] == [c["function"] for c in expected]


def test_qwen_tools_reach_its_template(server, qwen):
    with_tools = post(server, "/v1/chat/completions", qwen_body(max_tokens=1)).json()
    without = post(server, "/v1/chat/completions",
                   {**qwen_body(max_tokens=1), "tools": None}).json()
    assert with_tools["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"] + 50


def test_qwen_text_around_a_call_and_reasoning(server, qwen):
    regex = ('<think>The user wants the weather\\.</think>\\n\\nLet me check\\.\\n'
             + CALLS.split("\\n<tool_call>")[0] + "")
    body = qwen_body(structured_outputs={"regex": regex})
    choice = validate(post(server, "/v1/chat/completions", body).json(),
                      "CreateChatCompletionResponse")["choices"][0]
    message = choice["message"]
    assert message["reasoning_content"] == "The user wants the weather."
    assert message["content"].strip() == "Let me check."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    _, chunks = sse(server, "/v1/chat/completions", body, "CreateChatCompletionStreamResponse")
    content, calls, reasoning, reason = reassemble(chunks)
    assert reasoning == message["reasoning_content"] and content == message["content"]
    assert reason == "tool_calls" and [c["function"] for c in calls] == \
        [c["function"] for c in message["tool_calls"]]


def test_qwen_tool_choice_none_does_not_parse(server, qwen):
    body = qwen_body(structured_outputs={"regex": CALLS}, tool_choice="none")
    choice = validate(post(server, "/v1/chat/completions", body).json(),
                      "CreateChatCompletionResponse")["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"].startswith("<tool_call>")


def test_qwen_history_with_calls_renders(server, qwen):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]
    r = post(server, "/v1/chat/completions", qwen_body(messages=messages, max_tokens=4))
    assert r.status_code == 200, r.text


def test_qwen_reasoning_with_response_format(server, qwen):
    """The thought is free; the answer after it follows the schema."""
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
              "required": ["city"], "additionalProperties": False}
    body = {"model": "tiny-qwen2", "messages": ASK, "temperature": 0, "max_tokens": 60,
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}
    choice = validate(post(server, "/v1/chat/completions", body).json(),
                      "CreateChatCompletionResponse")["choices"][0]
    if choice["finish_reason"] == "stop":
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    else:   # a random model may think until max_tokens: then there is no answer yet
        assert choice["finish_reason"] == "length" and choice["message"].get("reasoning_content")


# -- reasoning_effort: a tiny Qwen3 with a thinking template --------------------------

@pytest.fixture(scope="module")
def thinking(server, tmp_path_factory):
    from llmhost.dev.tinymodels import build_qwen3_thinking

    path = build_qwen3_thinking(str(tmp_path_factory.mktemp("think") / "tiny-qwen3"))
    server.load(path, id="tiny-thinking")
    return "tiny-thinking"


def think(server, **extra) -> tuple[dict, dict]:
    """(message, usage): the template opens a thought unless thinking is off,
    so a random model's whole output is its thought, or all answer."""
    body = {"model": "tiny-thinking", "messages": ASK, "temperature": 0, "max_tokens": 8, **extra}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    out = validate(r.json(), "CreateChatCompletionResponse")
    return out["choices"][0]["message"], out["usage"]


def test_reasoning_effort_reaches_the_template(server, thinking):
    plain, plain_usage = think(server)
    assert plain.get("reasoning_content") and not plain.get("content")
    high, high_usage = think(server, reasoning_effort="high")   # "Reasoning: high" system turn
    assert high.get("reasoning_content") and high_usage["prompt_tokens"] > plain_usage["prompt_tokens"]
    minimal, _ = think(server, reasoning_effort="minimal")     # still thinks (generation/reasoning.py)
    assert minimal.get("reasoning_content")
    off, off_usage = think(server, reasoning_effort="none")     # enable_thinking=False
    assert "reasoning_content" not in off and off["content"]
    assert off_usage["prompt_tokens"] != high_usage["prompt_tokens"]
    counted = post(server, "/tokenize", {"model": "tiny-thinking", "messages": ASK,
                                         "reasoning_effort": "none"}).json()
    assert counted["count"] == off_usage["prompt_tokens"], counted
    # The client's chat_template_kwargs win over what the effort sets.
    on, _ = think(server, reasoning_effort="none", chat_template_kwargs={"enable_thinking": True})
    assert on.get("reasoning_content")
    kw_off, _ = think(server, chat_template_kwargs={"enable_thinking": False})
    assert "reasoning_content" not in kw_off and kw_off["content"]
    _, chunks = sse(server, "/v1/chat/completions", {
        "model": "tiny-thinking", "messages": ASK, "temperature": 0, "max_tokens": 8,
        "reasoning_effort": "none"}, "CreateChatCompletionStreamResponse")
    content, _, reasoning, _ = reassemble(chunks)
    assert content == off["content"] and reasoning == ""


def test_reasoning_effort_on_responses(server, thinking):
    def output(**extra):
        r = post(server, "/v1/responses", {"model": "tiny-thinking", "input": "Hello",
                                            "temperature": 0, "max_output_tokens": 8,
                                            "store": False, **extra})
        assert r.status_code == 200, r.text
        return [item["type"] for item in validate(r.json(), "Response")["output"]]

    assert "reasoning" in output()
    assert output(reasoning={"effort": "none"}) == ["message"]


def test_chat_template_kwargs_cannot_set_what_llmhost_passes(server, thinking):
    r = post(server, "/v1/chat/completions", {"model": "tiny-thinking", "messages": ASK,
                                              "chat_template_kwargs": {"tools": []}})
    assert_error(r, 400, "chat_template_kwargs")


# -- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]},
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wrong"}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"functions": [TIME["function"]], "function_call": {"name": "nope"}}, "function_call"),
])
def test_bad_tools_are_400_and_do_not_poison_the_batch(server, smollm2, extra, param):
    free = {"model": "smollm2", "messages": ASK, "temperature": 0, "max_tokens": 8}
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(post, server, "/v1/chat/completions", free)
        assert_error(post(server, "/v1/chat/completions", {**free, **extra}), 400, param)
        assert good.result().status_code == 200
