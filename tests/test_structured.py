"""Structured outputs (response_format json_object / json_schema and the
structured_outputs extra) on the real SmolLM2 through gunicorn: every answer
parses and validates, streamed or not, n=2, next to free requests in one batch."""
import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pydantic
import pytest
import requests

from genutil import post, sse
from support import assert_error, validate

ASK = [{"role": "user", "content": "Describe a person called Ada as JSON."}]

# Bounded strings and arrays so greedy answers end within max_tokens.
S = {"type": "string", "maxLength": 12}
SCHEMAS = {
    "object": {"type": "object", "properties": {"name": S, "age": {"type": "integer"}},
               "required": ["name", "age"], "additionalProperties": False},
    "array_enum": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                   "minItems": 1, "maxItems": 3},
    "enum": {"enum": ["yes", "no", "maybe"]},
    "const": {"type": "object", "properties": {"kind": {"const": "person"}, "name": S},
              "required": ["kind", "name"], "additionalProperties": False},
    "bounds": {"type": "object", "properties": {
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "count": {"type": "integer", "minimum": 10, "maximum": 20}},
        "required": ["score", "count"], "additionalProperties": False},
    "pattern_format": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "born": {"type": "string", "format": "date"}},
        "required": ["code", "born"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {"name": S, "nick": S, "ok": {"type": "boolean"}},
                 "required": ["ok"], "additionalProperties": False},
    "anyof": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                        {"type": "object", "properties": {"error": S}, "required": ["error"],
                         "additionalProperties": False}]},
    "refs": {"type": "object", "$defs": {"point": {
        "type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
        "required": ["x", "y"], "additionalProperties": False}},
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"people": {
        "type": "array", "maxItems": 2, "items": {
            "type": "object", "properties": {"name": S, "tags": {
                "type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 6}}},
            "required": ["name", "tags"], "additionalProperties": False}}},
        "required": ["people"], "additionalProperties": False},
    "null_bool": {"type": "object", "properties": {"a": {"type": "null"}, "b": {"type": "boolean"}},
                  "required": ["a", "b"], "additionalProperties": False},
}


def body(schema: dict, model: str = "smollm2", **extra) -> dict:
    return {"model": model, "messages": ASK, "temperature": 0, "max_tokens": 64,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "answer", "schema": schema, "strict": True}},
            **extra}


def _check(schema: dict, text: str) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


@pytest.fixture(scope="module")
def rows_alone(server, smollm2_gguf):
    """SmolLM2 loaded int4, where every row is computed alone (llmhost's int4
    kernel and attention): a request's greedy answer does not depend on the
    rows beside it (docs/prefix-caching.md). A bfloat16 or float32 load's
    products round a row differently in a batch of 25 than alone (torch's
    matrix products take other paths), which flips near ties."""
    server.load(smollm2_gguf, id="smollm2-int4", quantization="int4")
    yield "smollm2-int4"
    requests.delete(server.url + "/v1/models/smollm2-int4", timeout=60)


@pytest.fixture(scope="module")
def answers(server, rows_alone):
    """Every schema asked at once with n=2 (one batch, with one free request
    among them), every other one streamed, "object" both ways:
    {name: [texts]}, the non-streamed and streamed "object" bodies, and the
    free answer batched and alone."""
    free = {"model": rows_alone, "messages": ASK, "temperature": 0, "max_tokens": 24}

    def plain(name):
        r = post(server, "/v1/chat/completions", body(SCHEMAS[name], rows_alone, n=2))
        assert r.status_code == 200, r.text
        full = validate(r.json(), "CreateChatCompletionResponse")
        return [(c["message"]["content"], c["finish_reason"]) for c in full["choices"]]

    def streamed(name):
        chunks = sse(server, "/v1/chat/completions", body(SCHEMAS[name], rows_alone, n=2),
                     "CreateChatCompletionStreamResponse")[1]
        texts, reasons = ["", ""], [None, None]
        for chunk in chunks:
            for c in chunk["choices"]:
                texts[c["index"]] += c["delta"].get("content") or ""
                reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
        return list(zip(texts, reasons))

    names = sorted(SCHEMAS)
    with ThreadPoolExecutor(len(names) + 2) as pool:
        free_future = pool.submit(post, server, "/v1/chat/completions", free)
        futures = {n: pool.submit(streamed if i % 2 else plain, n) for i, n in enumerate(names)}
        both = pool.submit(streamed if names.index("object") % 2 == 0 else plain, "object")
        out = {n: f.result() for n, f in futures.items()}
        other_object = both.result()
        mixed_free = free_future.result().json()
    alone_free = post(server, "/v1/chat/completions", free).json()
    return out, other_object, mixed_free, alone_free


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_answer_validates(answers, name):
    choices = answers[0][name]
    assert len(choices) == 2
    for text, reason in choices:
        assert reason == "stop", (text, reason)
        _check(SCHEMAS[name], text)


def test_streamed_equals_non_streamed(answers):
    assert answers[1] == answers[0]["object"]


def test_constrained_rows_leave_free_rows_alone(answers):
    """A free greedy request batched with constrained ones gives the same
    answer as alone (masks apply to their own rows only)."""
    mixed, alone = answers[2], answers[3]
    assert mixed["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]


def test_length_cut_is_length(server, smollm2):
    r = post(server, "/v1/chat/completions", body(SCHEMAS["nested"], max_tokens=5))
    choice = validate(r.json(), "CreateChatCompletionResponse")["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"].startswith("{")


def test_json_object_and_sampling(server, smollm2):
    """json_object with sampling and a seed: always one JSON object."""
    r = post(server, "/v1/chat/completions", {
        "model": "smollm2", "messages": ASK, "response_format": {"type": "json_object"},
        "temperature": 1.0, "seed": 7, "n": 2, "max_tokens": 64, "logprobs": True})
    full = validate(r.json(), "CreateChatCompletionResponse")
    for choice in full["choices"]:
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:
            assert choice["message"]["content"].startswith("{")
        assert choice["logprobs"]["content"]


def test_sdk_parse_with_pydantic(openai_client, smollm2):
    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        country: str = pydantic.Field(max_length=20)
        population: int

    completion = openai_client.chat.completions.parse(
        model="smollm2", messages=[{"role": "user", "content": "Tell me about Paris."}],
        response_format=City, temperature=0, max_tokens=80)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City)
    assert parsed.name


@pytest.mark.parametrize("extra, check", [
    ({"regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
    ({"choice": ["positive", "negative"]}, lambda t: t in ("positive", "negative")),
    ({"grammar": 'root ::= "The answer is " ("yes" | "no") "."'},
     lambda t: t in ("The answer is yes.", "The answer is no.")),
])
def test_structured_outputs_extra_on_chat_and_completions(server, smollm2, extra, check):
    chat = post(server, "/v1/chat/completions", {
        "model": "smollm2", "messages": [{"role": "user", "content": "Is this good?"}],
        "temperature": 0, "max_tokens": 20, "structured_outputs": extra})
    choice = validate(chat.json(), "CreateChatCompletionResponse")["choices"][0]
    assert check(choice["message"]["content"]), choice
    assert choice["finish_reason"] == "stop"
    comp = post(server, "/v1/completions", {
        "model": "smollm2", "prompt": "Review: great film. Verdict:", "temperature": 0,
        "max_tokens": 20, "structured_outputs": extra})
    choice = validate(comp.json(), "CreateCompletionResponse")["choices"][0]
    assert check(choice["text"]), choice


def test_response_format_on_completions(server, smollm2):
    r = post(server, "/v1/completions", {
        "model": "smollm2", "prompt": "A JSON object about Ada:", "temperature": 0,
        "max_tokens": 96, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": SCHEMAS["object"]}}})
    _check(SCHEMAS["object"], validate(r.json(), "CreateCompletionResponse")["choices"][0]["text"])


# -- bad input: 400 naming the field; the batch goes on -------------------------------

@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(unclosed"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= nothing_defined"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a" * 70000}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
])
def test_bad_grammars_are_400_and_do_not_poison_the_batch(server, smollm2, extra, param):
    free = {"model": "smollm2", "messages": ASK, "temperature": 0, "max_tokens": 8}
    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(post, server, "/v1/chat/completions", free)
        bad = post(server, "/v1/chat/completions", {**free, **extra})
        assert_error(bad, 400, param)
        assert good.result().status_code == 200
    assert post(server, "/v1/chat/completions", free).status_code == 200


def test_grammar_size_limit_is_a_setting(make_app, local_gpt2):
    """LLMHOST_MAX_GRAMMAR_BYTES (here 300) refuses bigger schemas, regexes and
    tool parameters with a 400 naming the field; a request under it is served."""
    client = make_app(MAX_GRAMMAR_BYTES=300).test_client()
    small = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    big = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(20)}}
    assert len(json.dumps(small)) < 300 < len(json.dumps(big))
    base = {"model": local_gpt2, "prompt": "Answer:", "max_tokens": 8, "temperature": 0}

    def fmt(schema):
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "x", "schema": schema}}}

    for path, body, param in [
        ("/v1/completions", fmt(big), "response_format.json_schema.schema"),
        ("/v1/completions", {"structured_outputs": {"regex": "é" * 151}},   # 302 bytes
         "structured_outputs.regex"),
        ("/v1/chat/completions", {"messages": ASK, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": big}}]}, "tools[0].function.parameters"),
    ]:
        error = assert_error(client.post(path, json={**base, **body}), 400, param)
        assert "LLMHOST_MAX_GRAMMAR_BYTES" in error["message"], error
    r = client.post("/v1/completions", json={**base, **fmt(small), "max_tokens": 16})
    assert r.status_code == 200, r.get_json()
    choice = r.get_json()["choices"][0]
    if choice["finish_reason"] == "stop":
        jsonschema.validate(json.loads(choice["text"]), small)
    regex = "(é|e)" * 40          # 240 bytes as UTF-8
    ok = client.post("/v1/completions", json={**base, "max_tokens": 64,
                                              "structured_outputs": {"regex": regex}})
    assert ok.status_code == 200, ok.get_json()
    text = ok.get_json()["choices"][0]["text"]
    assert re.fullmatch(regex, text) or ok.get_json()["choices"][0]["finish_reason"] == "length"
