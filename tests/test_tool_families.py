"""Tool calls in each model family's own syntax: tiny random Llama 3.1,
Mistral (Nemo, v3 tool format), Qwen 3.5 and Gemma 4 models carrying their REAL chat
templates (tests/data/templates) in the shared server, and, for every syntax the
grammar writes (Hermes, Qwen 3.5, Gemma 4, Llama 3.x, both Mistral forms),
xgrammar's mask driving random logits whose text transformers'
ResponseParser must read back as valid calls."""
import json
import os

import jsonschema
import pytest

from genutil import post, sse
from support import assert_error, validate
from test_tools import ASK, TOOLS as OPENAI_TOOLS, reassemble

TEMPLATES = os.path.join(os.path.dirname(__file__), "data", "templates")
FAMILIES = {"llama": "meta-llama-Llama-3.1-8B-Instruct", "mistral": "mistralai-Mistral-Nemo-Instruct-2407",
            "qwen3_5": "Qwen-Qwen3.5-4B", "gemma4": "google-gemma-4"}
FORCED = list(FAMILIES)

# test_tools' tools, every property typed: Gemma 4's template reads each one's "type".
TOOLS = json.loads(json.dumps(OPENAI_TOOLS))
TOOLS[0]["function"]["parameters"]["properties"]["unit"]["type"] = "string"
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
WEATHER_ARGS = {"city": "Paris", "unit": "celsius"}
TIME_ARGS = {"zone": "CET"}


def _json_regex(value: dict) -> str:
    """A regex matching exactly json.dumps(value) (", " and ": " separators)."""
    text = json.dumps(value)
    return "".join("\\" + c if c in "{}[]().*+?|^$\\" else c for c in text)


def one_call(family: str, name: str, args: dict) -> str:
    if family == "qwen3_5":
        params = "".join(f"<parameter={k}>\\n{v}\\n</parameter>\\n" for k, v in args.items())
        return f"<tool_call>\\n<function={name}>\\n{params}</function>\\n</tool_call>"
    if family == "gemma4":    # call:NAME{key:<|"|>value<|"|>,...}, as its template writes calls
        params = ",".join(f'{k}:<\\|"\\|>{v}<\\|"\\|>' for k, v in args.items())
        return f"<\\|tool_call>call:{name}\\{{{params}\\}}<tool_call\\|>"
    key = "parameters" if family == "llama" else "arguments"
    return _json_regex({"name": name, key: args})


def calls_regex(family: str, two: bool) -> str:
    """Output in the family's own call syntax: one call, or two parallel ones."""
    calls = [one_call(family, "get_weather", WEATHER_ARGS)]
    if two:
        calls.append(one_call(family, "get_time", TIME_ARGS))
    if family == "llama":   # the optional <|python_tag|>, then calls separated by "; "
        return ("<\\|python_tag\\|>" if two else "") + "; ".join(calls)
    if family == "qwen3_5":   # the prompt opened a thought: close it first
        return "</think>\\n\\n" + "\\n".join(calls)
    if family == "gemma4":
        return "".join(calls)
    return "\\[TOOL_CALLS\\]\\[" + ", ".join(calls) + "\\]"


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory) -> dict:
    """{family: model folder}: built once for this module."""
    from llmhost.dev.tinymodels import build_family_tools

    root = tmp_path_factory.mktemp("families")
    out = {}
    for family, name in FAMILIES.items():
        with open(os.path.join(TEMPLATES, name + ".jinja")) as fh:
            out[family] = build_family_tools(str(root / family), family, fh.read())
    return out


@pytest.fixture(scope="module")
def families(server, family_paths) -> dict:
    """{family: served model id}, loaded once in the shared server."""
    for family, path in family_paths.items():
        server.load(path, id=f"family-{family}")
    return {family: f"family-{family}" for family in family_paths}


def body(families, family: str, **extra) -> dict:
    return {"model": families[family], "messages": ASK, "temperature": 0, "max_tokens": 300,
            "tools": TOOLS, **extra}


def forced_body(families, family: str, **extra) -> dict:
    """Qwen 3.5's template opens a thought the random model would never close:
    its forced calls are asked with reasoning_effort "none" (the template's
    enable_thinking=False closes the thought in the prompt)."""
    if family == "qwen3_5":
        extra["reasoning_effort"] = "none"
    return body(families, family, **extra)


def chat(server, payload: dict) -> dict:
    r = post(server, "/v1/chat/completions", payload)
    assert r.status_code == 200, r.text
    return validate(r.json(), "CreateChatCompletionResponse")["choices"][0]


def check_calls(calls: list[dict], names=None) -> None:
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] in (names or PARAMS)
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS[call["function"]["name"]])


def same_stream(server, payload: dict, message: dict) -> list[dict]:
    """The streamed answer reassembles to the non-streamed one; its chunks."""
    _, chunks = sse(server, "/v1/chat/completions", payload, "CreateChatCompletionStreamResponse")
    content, calls, _, reason = reassemble(chunks)
    assert reason == "tool_calls"
    assert (content or None) == (message.get("content") or None)
    assert [c["function"] for c in calls] == [c["function"] for c in message["tool_calls"]]
    return chunks


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("two", [False, True], ids=["one", "two"])
def test_auto_parses_the_family_syntax(server, families, family, two):
    payload = body(families, family, structured_outputs={"regex": calls_regex(family, two)})
    choice = chat(server, payload)
    assert choice["finish_reason"] == "tool_calls", choice
    message = choice["message"]
    assert message["content"] is None
    expected = [("get_weather", WEATHER_ARGS)] + ([("get_time", TIME_ARGS)] if two else [])
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in message["tool_calls"]] == expected
    check_calls(message["tool_calls"])
    assert len({c["id"] for c in message["tool_calls"]}) == len(expected)
    same_stream(server, payload, message)


@pytest.mark.parametrize("family", FAMILIES)
def test_tool_choice_none_does_not_parse(server, families, family):
    choice = chat(server, body(families, family, tool_choice="none",
                               structured_outputs={"regex": calls_regex(family, False)}))
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"], choice
    assert "get_weather" in choice["message"]["content"]


@pytest.mark.parametrize("family", FAMILIES)
def test_tools_reach_the_family_template(server, families, family):
    with_tools = post(server, "/v1/chat/completions", body(families, family, max_tokens=1))
    without = post(server, "/v1/chat/completions",
                   {**body(families, family, max_tokens=1), "tools": None})
    assert with_tools.status_code == without.status_code == 200, with_tools.text
    grown = with_tools.json()["usage"]["prompt_tokens"] - without.json()["usage"]["prompt_tokens"]
    assert grown > 50


@pytest.mark.parametrize("family", FAMILIES)
def test_two_turn_loop_renders_in_the_family_template(server, families, family):
    """call -> tool result -> next turn, through the family's own template
    (Mistral's insists on 9-character call ids: llmhost maps OpenAI's)."""
    first = chat(server, body(families, family, structured_outputs={
        "regex": calls_regex(family, False)}))
    call = first["message"]["tool_calls"][0]
    history = ASK + [first["message"], {"role": "tool", "tool_call_id": call["id"],
                                        "content": json.dumps({"temperature": 21})}]
    r1 = post(server, "/v1/chat/completions", body(families, family, max_tokens=1))
    r2 = post(server, "/v1/chat/completions", body(families, family, messages=history, max_tokens=4))
    assert r2.status_code == 200, r2.text
    validate(r2.json(), "CreateChatCompletionResponse")
    # The call and the result are in the prompt: it grew by more than their text.
    grown = r2.json()["usage"]["prompt_tokens"] - r1.json()["usage"]["prompt_tokens"]
    assert grown > len(call["function"]["arguments"]) // 4


def test_gemma4_results_continue_the_model_turn(family_paths):
    """Gemma 4's template reads results from the calling turn's
    tool_responses: the tool messages fold into it and the model's turn goes
    on after them (no "tool" turn)."""
    from llmhost.generation.plan import chat_ids
    from llmhost.generation.request import ChatRequest
    from llmhost.models.registry import registry
    from support import load_local

    entry = load_local(family_paths["gemma4"], "local-gemma4")
    try:
        history = ASK + [
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_time", "arguments": json.dumps(TIME_ARGS)}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"time": "12:00"})}]
        ids, _ = chat_ids(ChatRequest(model="local-gemma4", messages=history, tools=TOOLS), entry)
        prompt = entry.tokenizer.decode(ids, skip_special_tokens=False)
    finally:
        registry.unload("local-gemma4")
    assert ('<|turn>model\n<|tool_call>call:get_time{zone:<|"|>CET<|"|>}<tool_call|>'
            '<|tool_response>response:get_time{time:<|"|>12:00<|"|>}<tool_response|>') in prompt
    assert "<|turn>tool" not in prompt and prompt.endswith("<|channel>thought\n<channel|>")


def test_llama_template_refuses_two_calls_in_history_with_a_400(server, families):
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": "get_time", "arguments": json.dumps(TIME_ARGS)}} for i in range(2)]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": calls},
                     {"role": "tool", "tool_call_id": "call_0", "content": "12:00"},
                     {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    assert_error(post(server, "/v1/chat/completions", body(families, "llama", messages=history)),
                 400, "messages")


@pytest.mark.parametrize("family", FORCED)
@pytest.mark.parametrize("parallel", [False, True], ids=["single", "parallel"])
@pytest.mark.parametrize("choice", ["required", "get_time"])
def test_forced_calls_in_the_family_syntax(server, families, family, parallel, choice):
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    payload = forced_body(families, family, tool_choice=tool_choice,
                          parallel_tool_calls=parallel, max_tokens=200)
    result = chat(server, payload)
    calls = result["message"].get("tool_calls")
    assert calls, result
    check_calls(calls, None if choice == "required" else [choice])
    if not parallel or choice != "required":
        assert len(calls) == 1 and result["finish_reason"] == "tool_calls", result
        same_stream(server, payload, result["message"])
    else:     # a random model may go on calling until max_tokens
        assert result["finish_reason"] in ("tool_calls", "length"), result


@pytest.mark.parametrize("family", FORCED)
def test_auto_with_response_format_calls_or_answers(server, families, family):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}},
              "required": ["answer"], "additionalProperties": False}
    result = chat(server, forced_body(families, family, parallel_tool_calls=False, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}))
    if result["finish_reason"] == "tool_calls":
        check_calls(result["message"]["tool_calls"])
        assert len(result["message"]["tool_calls"]) == 1
    else:
        assert result["finish_reason"] == "stop", result
        jsonschema.validate(json.loads(result["message"]["content"]), schema)


# -- the grammar writes what the parser reads, for every syntax ------------------------

def _parse_templates() -> dict:
    from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS

    from llmhost.generation import parsing

    by_type = {t: v for types, v in _RESPONSE_TEMPLATE_FALLBACKS.items() for t in types}
    # (template, the prompt's tail the parser is given as prefix)
    return {"hermes": (parsing.HERMES, ""), "llama3": (parsing.LLAMA3, ""),
            "mistral": (parsing.MISTRAL, ""), "mistral_v03": (parsing.MISTRAL, ""),
            "mistral_args": (parsing.MISTRAL_ARGS, ""),
            "qwen3_5": (by_type["qwen3_5"], "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
            "gemma4": (by_type["gemma4"], "<|turn>model\n")}


def test_transformers_fallback_templates_are_read_as_its_table():
    """parsing reads transformers serve's fallback table from its file as a
    literal (without running the module): the same table, every family found."""
    from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS

    from llmhost.generation import parsing

    assert parsing._fallback_templates() == _RESPONSE_TEMPLATE_FALLBACKS
    for model_type in ("qwen2", "qwen3", "qwen3_5", "gemma4"):
        assert parsing._transformers_family(model_type) == next(
            v for types, v in _RESPONSE_TEMPLATE_FALLBACKS.items() if model_type in types)
    assert parsing._transformers_family("llama") is None


@pytest.fixture(scope="module")
def grammar_tokenizer():
    """A byte-level tokenizer where the families' markers are special tokens."""
    from llmhost.dev.tinymodels import build_tokenizer

    tok = build_tokenizer(512, chat=True)
    tok.add_special_tokens({"additional_special_tokens": [
        "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", "<|tool_call>", "<tool_call|>"]})
    tok.add_tokens(["<tool_call>", "</tool_call>", "<think>", "</think>"])
    return tok


# Bounded values only: random logits would write strings for hundreds of
# tokens, and xgrammar 0.2.8 lets a string with maxLength hold raw control
# characters (invalid JSON), which a model never writes but random logits do.
GRAMMAR_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                         "unit": {"enum": ["celsius", "fahrenheit"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]},
                                         "exact": {"type": "boolean"}},
        "required": ["zone", "exact"], "additionalProperties": False}}},
]
CALL_BEGINS = {"hermes": "<tool_call>", "qwen3_5": "<function=", "gemma4": "<|tool_call>",
               "llama3": '{"name"', "mistral": '{"name"', "mistral_v03": '{"name"',
               "mistral_args": "[ARGS]"}
GRAMMAR_PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in GRAMMAR_TOOLS}


@pytest.mark.parametrize("syntax", ["hermes", "qwen3_5", "gemma4", "llama3", "mistral", "mistral_v03",
                                    "mistral_args"])
@pytest.mark.parametrize("choice, parallel", [("required", True), ("required", False),
                                              ("get_weather", True)])
def test_grammar_output_parses_back(grammar_tokenizer, syntax, choice, parallel):
    """Random logits under the forced-calls grammar (several seeds): the text
    always parses into calls whose arguments validate."""
    import torch
    import xgrammar as xgr

    from llmhost.generation import callgrammar
    from llmhost.engine import constrain
    from llmhost.generation.parsing import OutputParser, join_calls, markers
    from llmhost.generation.text import ChoiceText

    tok = grammar_tokenizer
    template, prefix = _parse_templates()[syntax]
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    # Mistral 7B v0.3's template writes "[TOOL_CALLS] [" (Nemo's "[TOOL_CALLS][").
    source = '{{- "[TOOL_CALLS] [" }}' if syntax == "mistral_v03" else ""
    fmt = callgrammar.calls_format(syntax.replace("_v03", ""), GRAMMAR_TOOLS, tool_choice, parallel,
                                   source)
    comp = constrain.compiler(tok, tok, len(tok), [tok.eos_token_id])
    compiled = constrain.structural_tag(comp, {"type": "structural_tag", "format": fmt})
    keep = markers(template, tok)
    list_end = tok.convert_tokens_to_ids("]")
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        matcher = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, len(tok))
        text, ids = ChoiceText(tok, keep=keep), []
        parser = OutputParser(template, prefix, GRAMMAR_TOOLS, keep=keep)
        deltas = []
        for _ in range(400):
            logits = torch.randn(1, len(tok), generator=gen)
            # Parallel: at least two calls before the end; then end when allowed.
            begun = tok.decode(ids, skip_special_tokens=False).count(CALL_BEGINS[syntax])
            logits[0, tok.eos_token_id] += -50.0 if parallel and begun < 2 else 3.0
            logits[0, list_end] += -50.0 if parallel and begun < 2 else 3.0   # Mistral's "]"
            matcher.fill_next_token_bitmask(mask, 0)
            xgr.apply_token_bitmask_inplace(logits, mask)
            token = int(torch.argmax(logits))
            assert matcher.accept_token(token)
            if token == tok.eos_token_id:
                break
            ids.append(token)
            deltas += parser.feed(text.add(token)[0]).tool_calls
        assert matcher.is_terminated(), tok.decode(ids, skip_special_tokens=False)
        deltas += parser.feed(text.finish()[0]).tool_calls + parser.finish().tool_calls
        written = tok.decode(ids, skip_special_tokens=False)
        assert written.startswith("[TOOL_CALLS] [") == (syntax == "mistral_v03"), written
        assert not parser.broken, written
        calls = join_calls([], deltas)
        assert calls, written
        for call in calls:
            assert call["id"].startswith("call_")
            assert choice == "required" or call["function"]["name"] == choice
            jsonschema.validate(json.loads(call["function"]["arguments"]),
                                GRAMMAR_PARAMS[call["function"]["name"]])
        if choice != "required" or not parallel:
            assert len(calls) == 1, written
        else:
            assert len(calls) >= 2, written


def test_special_token_delimiters_reach_the_parser(grammar_tokenizer):
    """[TOOL_CALLS] / [ARGS] are special tokens (as in Mistral's tokenizer):
    decoding skips special tokens, except the family's delimiters."""
    from llmhost.generation.parsing import MISTRAL_ARGS, OutputParser, join_calls, markers
    from llmhost.generation.text import ChoiceText

    tok = grammar_tokenizer
    ids = tok("[TOOL_CALLS]get_time[ARGS]{\"zone\": \"CET\"}")["input_ids"]
    assert tok.convert_tokens_to_ids("[TOOL_CALLS]") in ids
    keep = markers(MISTRAL_ARGS, tok)
    assert sorted(keep.values()) == ["[ARGS]", "[TOOL_CALLS]"]
    for kept, expected in ((keep, [{"name": "get_time", "arguments": '{"zone": "CET"}'}]), (None, [])):
        text, parser = ChoiceText(tok, keep=kept), OutputParser(MISTRAL_ARGS, "", TOOLS, keep=kept)
        deltas = [d for i in ids for d in parser.feed(text.add(i)[0]).tool_calls]
        deltas += parser.feed(text.finish()[0]).tool_calls + parser.finish().tool_calls
        assert [c["function"] for c in join_calls([], deltas)] == expected
