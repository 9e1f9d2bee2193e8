"""The Responses API's translation and rendering without a model: request
items to chat messages, and the chat layer's choices (text, tool calls,
reasoning; see generation/run.py) to output items and stream events, each
checked against the official schemas. Generation itself is tested end to end
in test_responses.py; this covers the tool-call and reasoning shapes that
the chat layer hands over."""
from contextlib import ExitStack
from types import SimpleNamespace

import pytest

from llmhost.generation import conversation
from llmhost.api.responses import Renderer, _events
from llmhost.generation.run import Choice, ChoiceDelta
from llmhost.engine.errors import InvalidInput, ModelClosed
from support import validate

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_items_become_chat_messages():
    items = conversation.input_items([
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris and Rome?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather",
         "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "rain"}]},
    ])
    for item in items:
        validate(item, "ItemResource")
    messages = conversation.chat_messages("Be brief.", items, 0)
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    ]


def test_request_fields_become_chat_arguments():
    args = {"model": "m", "instructions": None, "max_output_tokens": 7, "temperature": 0,
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"},
                       "strict": True}],
            "tool_choice": {"type": "function", "name": "f"}, "parallel_tool_calls": False,
            "text": {"format": {"type": "json_schema", "name": "City", "strict": True,
                                "schema": {"type": "object"}}},
            "reasoning": {"effort": "low"}}
    chat = conversation.chat_args(args, conversation.input_items("hi"), 0)
    assert chat == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7,
        "temperature": 0, "parallel_tool_calls": False,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"},
                                                    "strict": True}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "City", "schema": {"type": "object"}, "strict": True}},
        "reasoning_effort": "low"}


def test_an_output_without_its_call_is_refused():
    items = conversation.input_items([{"type": "function_call_output", "call_id": "c",
                                       "output": "x"}])
    with pytest.raises(InvalidInput) as caught:
        conversation.chat_messages(None, items, 0)
    assert caught.value.param == "input[0].call_id" and "'c'" in caught.value.message


def _started(deltas, params=None):
    """What serving.start hands over, around a stand-in for generation/run.Run:
    `deltas()` a generator, as Run's is; `cancel(reason)` records the reason."""
    cancelled: list[str] = []
    run = SimpleNamespace(deltas=lambda: (d for d in deltas), cancelled=False, prompt_tokens=11, cached_tokens=0,
                          cancel=cancelled.append, reasons=cancelled, completion_tokens=9,
                          params=params or SimpleNamespace(temperature=0.0, top_p=1.0))
    tokenizer = lambda text, add_special_tokens=False: {"input_ids": text.split()}
    entry = SimpleNamespace(id="m", tokenizer=tokenizer)
    return SimpleNamespace(entry=entry, run=run, stack=ExitStack(), fields={},
                           log_content=False)


def _delta(index=0, text="", finish=None, tool_calls=None, reasoning=None) -> ChoiceDelta:
    delta = ChoiceDelta(index, text, [], finish)
    delta.tool_calls = tool_calls        # the chat layer's fields (issue 11)
    delta.reasoning = reasoning
    return delta


def test_choice_with_reasoning_and_tool_calls_becomes_items():
    choice = Choice(0, "", [], "tool_calls")
    output = conversation.output_items(choice.text, [CALL], "Paris first.", "completed")
    assert [o["type"] for o in output] == ["reasoning", "function_call"]
    assert output[1]["call_id"] == "call_1" and output[1]["arguments"] == '{"city": "Paris"}'
    renderer = Renderer({"model": "m", "tools": [{"type": "function", "name": "get_weather"}]},
                        _started([]))
    body = renderer.body("completed", output, renderer.usage("Paris first."))
    validate(body, "Response")
    assert body["usage"]["output_tokens_details"]["reasoning_tokens"] == 2
    assert body["output_text"] == ""


def test_stream_of_reasoning_then_tool_calls():
    deltas = [
        _delta(reasoning="Paris "), _delta(reasoning="first."),
        _delta(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}}]),
        _delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
        _delta(tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}]),
        _delta(tool_calls=[{"index": 1, "id": "call_2", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}],
               finish="tool_calls"),
    ]
    renderer = Renderer({"model": "m", "stream": True}, _started(deltas))
    events = list(_events(renderer, None))
    for event in events:
        validate(event, "ResponseStreamEvent")
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    final = validate(events[-1]["response"], "Response")
    assert [(o["type"], o.get("call_id")) for o in final["output"]] == [
        ("reasoning", None), ("function_call", "call_1"), ("function_call", "call_2")]
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "Paris first."}]
    assert [o.get("arguments") for o in final["output"][1:]] == ['{"city": "Paris"}',
                                                                 '{"city": "Rome"}']
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [d["name"] for d in done] == ["get_weather", "get_weather"]


def test_stream_cut_by_the_budget_is_incomplete():
    deltas = [_delta(text="Hello"), _delta(text=" there", finish="length")]
    events = list(_events(Renderer({"model": "m", "max_output_tokens": 2},
                                   _started(deltas)), None))
    for event in events:
        validate(event, "ResponseStreamEvent")
    final = events[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["response"]["output"][0]["status"] == "incomplete"
    assert final["response"]["output_text"] == "Hello there"


def test_stream_error_is_response_failed():
    def deltas():
        yield _delta(text="Hi")
        raise ModelClosed("The model 'm' was unloaded.")     # the engine's own error

    started = _started([])
    started.run.deltas = deltas
    events = list(_events(Renderer({"model": "m"}, started), None))
    for event in events:
        validate(event, "ResponseStreamEvent")
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["message"] == "The model 'm' was unloaded."


def test_stream_closed_early_cancels_the_run():
    """A client gone before the first delta: closing the event stream cancels
    the run (closing deltas that never started would not)."""
    started = _started([_delta(text="Hi", finish="stop")])
    events = _events(Renderer({"model": "m", "stream": True}, started), None)
    assert next(events)["type"] == "response.created"
    events.close()
    assert len(started.run.reasons) == 1 and "client went away" in started.run.reasons[0]
