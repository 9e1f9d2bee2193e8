"""POST /v1/chat/completions: end to end through gunicorn and the official
openai client (SmolLM2 against in-process transformers, tiny models for the
sampling parameters), and every bad input through the Flask test client."""
import json
import re
import socket
import time

import openai
import pytest
from transformers import AutoTokenizer

from genutil import eos_ids, post, reference, sse
from llmhost.generation.text import token_bytes
from support import assert_error, counts, validate

# SmolLM2 answers this greedily with an emoji and CJK characters that its
# byte-level tokenizer splits across several tokens each.
REPEAT = [{"role": "user", "content": "Repeat after me: I love 🍕 and 日本!"}]
REPEAT_BODY = {"model": "smollm2", "messages": REPEAT, "temperature": 0, "max_tokens": 16,
               "logprobs": True, "top_logprobs": 3}


@pytest.fixture(scope="module")
def tiny(server, tiny_models):
    server.load(tiny_models["gpt2"], id="tiny-gpt2")
    server.load(tiny_models["llama"], id="tiny-llama")
    return {"gpt2": AutoTokenizer.from_pretrained(tiny_models["gpt2"]),
            "llama": AutoTokenizer.from_pretrained(tiny_models["llama"])}


@pytest.fixture(scope="module")
def repeat(server, smollm2) -> dict:
    """The greedy non-streaming answer to REPEAT (with logprobs), asked once."""
    r = post(server, "/v1/chat/completions", REPEAT_BODY)
    assert r.status_code == 200, r.text
    return validate(r.json(), "CreateChatCompletionResponse")


# -- SmolLM2: exactly what transformers generates ----------------------------------

def test_greedy_chat_equals_transformers_generate(repeat, smollm2_reference):
    tok, _ = smollm2_reference
    ids = tok.apply_chat_template(REPEAT, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    expected = reference(smollm2_reference, ids, 16)
    choice = repeat["choices"][0]
    assert counts(repeat["usage"]) == {"prompt_tokens": len(ids),
                                       "completion_tokens": len(expected),
                                       "total_tokens": len(ids) + len(expected)}
    # Token for token: the bytes of every generated token (the stop token is not text).
    visible = [i for i in expected if i not in eos_ids(smollm2_reference)]
    assert [bytes(e["bytes"]) for e in choice["logprobs"]["content"]] == \
        [token_bytes(tok, i) for i in visible]
    assert choice["message"]["content"] == tok.decode(expected, skip_special_tokens=True)
    assert choice["finish_reason"] == ("stop" if expected[-1] in eos_ids(smollm2_reference)
                                       else "length")
    assert "🍕" in choice["message"]["content"] and "日本" in choice["message"]["content"]
    assert repeat["id"].startswith("chatcmpl-") and repeat["model"] == "smollm2"
    assert repeat["system_fingerprint"].startswith("fp_")


def test_logprobs_shape_and_greedy_token_is_the_most_likely(repeat):
    entries = repeat["choices"][0]["logprobs"]["content"]
    assert entries and repeat["choices"][0]["logprobs"]["refusal"] is None
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert entry["logprob"] == pytest.approx(top[0]["logprob"], abs=1e-5)
        assert entry["bytes"] == top[0]["bytes"] and entry["logprob"] <= 0
    text = b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8")
    assert text == repeat["choices"][0]["message"]["content"]


def test_stream_equals_non_stream_and_keeps_characters_whole(server, repeat):
    body = {**REPEAT_BODY, "stream_options": {"include_usage": True}}
    _, chunks = sse(server, "/v1/chat/completions", body, "CreateChatCompletionStreamResponse")
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk, content = chunks[-1], chunks[1:-1]
    assert usage_chunk["choices"] == [] and counts(usage_chunk["usage"]) == counts(repeat["usage"])
    deltas = [c["choices"][0]["delta"].get("content", "") for c in content]
    # Every delta is whole characters: no replacement character from a split emoji.
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == repeat["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in content][-1] == \
        repeat["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    streamed = [e for c in content for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == repeat["choices"][0]["logprobs"]["content"]


def _spanning_stop(repeat) -> tuple[str, str]:
    """A stop string that spans a token boundary next to a multi-byte
    character, and the text expected before it."""
    text = repeat["choices"][0]["message"]["content"]
    pieces = [bytes(e["bytes"]) for e in repeat["choices"][0]["logprobs"]["content"]]
    boundaries = []
    for k in range(1, len(pieces)):
        try:
            boundaries.append(len(b"".join(pieces[:k]).decode("utf-8")))
        except UnicodeDecodeError:
            continue
    usable = [p for p in boundaries if 2 <= p <= len(text) - 2
              and text.find(text[p - 2:p + 2]) == p - 2]
    pos = next((p for p in usable if not text[p - 2:p + 2].isascii()), usable[len(usable) // 2])
    return text[pos - 2:pos + 2], text[:pos - 2]


def test_stop_string_spanning_tokens(openai_client, repeat):
    stop, before = _spanning_stop(repeat)
    kwargs = dict(model="smollm2", messages=REPEAT, temperature=0, max_tokens=16,
                  stop=[stop, "never appears"])
    r = openai_client.chat.completions.create(**kwargs)
    validate(r.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    assert r.choices[0].message.content == before
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < repeat["usage"]["completion_tokens"]
    text, reasons = "", []
    for chunk in openai_client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reasons.append(choice.finish_reason)
    assert text == before and reasons[-1] == "stop"


CANCELLED = r"cancelled a smollm2 request after (\d+) generated tokens"


def hang_up(server, body: bytes, wait_for: bytes | None, seconds: float = 2) -> int:
    """Send a raw request, wait (for `wait_for` in the answer, or `seconds`),
    hang up; then the number of tokens the server says it generated before it
    cancelled."""
    before = len(re.findall(CANCELLED, server.log()))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                     b"\r\n\r\n" + body)
        if wait_for is None:
            time.sleep(seconds)
        else:
            received = b""
            while wait_for not in received:
                received += sock.recv(4096)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.findall(CANCELLED, server.log())
        if len(found) > before:
            return int(found[-1])
        time.sleep(0.2)
    raise AssertionError("no cancellation logged: " + server.log()[-2000:])


# 4,000 tokens with SmolLM2's end-of-text banned: a generation that ignored the hang-up
# would run for a minute or more; one that stops does so at a few hundred tokens at most
# (about 2 s of decoding at 50-120 tok/s; the tests assert half the budget)
STORY = {"model": "smollm2", "max_tokens": 4000, "temperature": 0, "logit_bias": {"2": -100},
         "messages": [{"role": "user", "content": "Write a long story about a dragon."}]}


def test_client_gone_cancels_non_streaming(server, smollm2):
    """A client that hangs up stops its generation: the cancellation shows up
    in seconds, long before the request's budget."""
    assert hang_up(server, json.dumps(STORY).encode(), None) < STORY["max_tokens"] // 2


def test_client_gone_cancels_stream(server, smollm2):
    body = json.dumps({**STORY, "stream": True}).encode()
    assert hang_up(server, body, b"data: {") < STORY["max_tokens"] // 2


# -- tiny models: parameters, templates -----------------------------------------------

def test_fallback_template_on_gpt2(openai_client, tiny):
    r = openai_client.chat.completions.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": "hello there"}], max_tokens=4)
    validate(r.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    expected = tiny["gpt2"]("User: hello there\n\nAssistant:")["input_ids"]
    assert r.usage.prompt_tokens == len(expected)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"


def test_model_template_and_message_forms(server, tiny):
    tok = tiny["llama"]

    def prompt_tokens(messages) -> int:
        r = post(server, "/v1/chat/completions", {"model": "tiny-llama", "messages": messages,
                                                   "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]
    ids = tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert prompt_tokens(plain) == len(ids)
    parts = [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
             {"role": "user", "name": "ann", "content": [{"type": "text", "text": "a"},
                                                           {"type": "text", "text": "b"}]}]
    assert prompt_tokens(parts) == len(ids)
    tools = [*plain, {"role": "assistant", "content": None},
             {"role": "tool", "content": "42", "tool_call_id": "call_1"}]
    assert prompt_tokens(tools) > len(ids)


def test_chat_template_given_at_load(server, tiny_models, tiny):
    server.load(tiny_models["gpt2"], id="tiny-gpt2-template",
                chat_template="{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    r = post(server, "/v1/chat/completions", {"model": "tiny-gpt2-template", "max_tokens": 1,
                                              "messages": [{"role": "user", "content": "hello"}]})
    assert r.json()["usage"]["prompt_tokens"] == len(tiny["gpt2"]("<hello>")["input_ids"])


def test_n_with_seed_is_reproducible(openai_client, tiny):
    def ask(seed):
        r = openai_client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "tell me"}], n=3,
            seed=seed, temperature=1.0, top_p=1.0, max_tokens=8)
        assert [c.index for c in r.choices] == [0, 1, 2]
        return [c.message.content for c in r.choices]

    first = ask(11)
    assert ask(11) == first
    assert len(set(first)) > 1            # choices are sampled independently
    assert ask(12) != first


def test_logit_bias_forces_and_bans_tokens(openai_client, tiny):
    paris = tiny["gpt2"](" paris")["input_ids"]
    assert len(paris) == 1
    r = openai_client.chat.completions.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        temperature=1.0, logit_bias={str(paris[0]): 100})
    assert r.choices[0].message.content == " paris" * 5

    kwargs = dict(model="tiny-gpt2", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                  temperature=0, logprobs=True)
    greedy = openai_client.chat.completions.create(**kwargs).choices[0].logprobs.content[0]
    banned_id = next(i for i in range(len(tiny["gpt2"]))
                     if list(token_bytes(tiny["gpt2"], i)) == greedy.bytes)
    r = openai_client.chat.completions.create(**kwargs, logit_bias={str(banned_id): -100})
    assert all(e.bytes != greedy.bytes for e in r.choices[0].logprobs.content)


def test_not_loaded_model_is_404_listing_models(openai_client, tiny):
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.chat.completions.create(model="no-such-model", max_tokens=1,
                                              messages=[{"role": "user", "content": "x"}])
    message = info.value.body["message"]
    assert "tiny-gpt2" in message and "POST /v1/models" in message


def test_error_after_stream_started_is_an_event_then_done(server, tiny_models):
    """Unloading a model mid-stream: the client gets the error envelope as an
    event, then [DONE], inside the 200 it already has."""
    import requests

    server.load(tiny_models["long"], id="tiny-llama-unload")
    r = requests.post(server.url + "/v1/chat/completions", stream=True, timeout=60, json={
        "model": "tiny-llama-unload", "stream": True, "n": 8, "max_tokens": 4000,
        "logit_bias": {"2": -100},  # no EOS (<|im_end|>): every choice runs until the unload
        "messages": [{"role": "user", "content": "go"}]})
    lines = r.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line).startswith("data: {")
    assert requests.delete(server.url + "/v1/models/tiny-llama-unload", timeout=60).ok
    rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    error = rest[-2]
    assert '"error"' in error and "unloaded" in error, rest[-3:]


# -- bad input: 400 naming the field (Flask test client; no model needed) -------------

MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("change, param", [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),
    ({"n": 1.5}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": None}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [MSG[0], {"content": "x"}]}, "messages[1].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": "http://x/y.png"}]}]},
     "messages[0].content[1].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio",
                                                 "input_audio": {"data": "", "format": "wav"}}]}]},
     "messages[0].content[0].type"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"seed": "x"}, "seed"),
    ({"model": None}, "model"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"description": "f"}}]}, "tools[0].function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f", "parameters": {"type": "array"}}]}, "functions[0].parameters"),
])
def test_bad_input(client, change, param):
    body = {"model": "m", "messages": MSG, **change}
    if change.get("model", "") is None:
        del body["model"]
    error = assert_error(client.post("/v1/chat/completions", json=body), 400, param)
    assert param.split("[")[0].split(".")[0] in error["message"]


def test_unknown_part_names_the_types_taken(client):
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": [
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}]})
    message = assert_error(r, 400, "messages[0].content[0].type")["message"]
    assert "'text'" in message and "'image_url'" in message   # images: tests/test_vision.py


# -- checks that need the model (in-process tiny GPT-2) -----------------------------------

def test_max_tokens_beyond_context(client, local_gpt2):
    r = client.post("/v1/chat/completions", json={"model": local_gpt2, "messages": MSG,
                                                  "max_tokens": 300})
    error = assert_error(r, 400, "max_tokens")
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 256 tokens" in error["message"]
    assert re.search(r"requested \d+ tokens \(\d+ in the messages, 300 in the completion\)",
                     error["message"])
    r = client.post("/v1/chat/completions", json={"model": local_gpt2, "messages": MSG,
                                                  "max_completion_tokens": 300})
    assert_error(r, 400, "max_completion_tokens")


def test_long_prompt_without_max_tokens(client, local_gpt2):
    long = [{"role": "user", "content": "hello world " * 200}]
    error = assert_error(client.post("/v1/chat/completions",
                                     json={"model": local_gpt2, "messages": long}), 400, "messages")
    assert "256" in error["message"]


def test_logit_bias_outside_vocabulary(client, local_gpt2):
    r = client.post("/v1/chat/completions", json={"model": local_gpt2, "messages": MSG,
                                                  "logit_bias": {"999999": 5}})
    assert_error(r, 400, "logit_bias")


def test_ignored_fields_are_accepted(client, local_gpt2):
    r = client.post("/v1/chat/completions", json={
        "model": local_gpt2, "messages": MSG, "max_tokens": 2, "user": "u1",
        "metadata": {"a": "b"}, "store": False, "parallel_tool_calls": True,
        "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
        "some_future_field": {"x": 1}, "stream_options": None})
    assert r.status_code == 200, r.get_json()
    body = validate(r.get_json(), "CreateChatCompletionResponse")
    assert body["usage"]["completion_tokens"] == 2


def test_default_max_tokens_fits_the_context(client, local_gpt2):
    """No max_tokens: the default (512) is lowered to what the 256-token context allows."""
    r = client.post("/v1/chat/completions", json={
        "model": local_gpt2, "messages": MSG, "temperature": 0, "logit_bias": {"471": 100}})
    body = r.get_json()
    assert r.status_code == 200, body
    assert body["usage"]["total_tokens"] == 256 and body["choices"][0]["finish_reason"] == "length"


def test_max_prompt_tokens_setting(tiny_models, local_gpt2):
    from llmhost import create_app
    from llmhost.config import TestConfig

    client = create_app(TestConfig(MAX_PROMPT_TOKENS=3)).test_client()
    r = client.post("/v1/chat/completions", json={"model": local_gpt2, "messages": MSG})
    assert "LLMHOST_MAX_PROMPT_TOKENS" in assert_error(r, 400, "messages")["message"]


def test_openapi_documents_both_routes(client):
    spec = client.get("/openapi.json").get_json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    completions = spec["paths"]["/v1/completions"]["post"]
    assert chat["summary"] == "Create a chat completion"
    assert completions["summary"] == "Create a completion"
    assert {"200", "400", "404", "429", "503"} <= set(chat["responses"])
    request = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "stop",
            "logit_bias", "logprobs", "top_logprobs", "stream_options"} <= set(request)
