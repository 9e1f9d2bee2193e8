"""Grammar-forced tool calls in the model family's own call syntax.

``tool_choice: "required"``, a named function, and tools together with
``response_format`` (``auto``: "calls, or the JSON answer") compile to an
xgrammar structural tag of *calls only*: one tag per allowed function whose
content is that function's ``parameters`` schema, joined by the family's
separator, at least one call, at most one when ``parallel_tool_calls`` is
false or a function is named. Each syntax is the one generation/parsing.py reads
for the family, so a forced answer always parses back into ``tool_calls``.

Where xgrammar ships the family's call format (``get_model_structural_tag``:
``qwen_3`` = Hermes / Qwen 2.5 / 3, ``qwen_3_5`` = Qwen 3.5's XML parameters,
``llama`` = Llama 3.x JSON), the tag of one call is xgrammar's (its
``tool_choice`` = that function). Its own "required" mode is not used: it lets
free text run before the first call (a model may ramble until ``max_tokens``
and never call), so the calls are joined here, with nothing else allowed.
Mistral has no builtin format and xgrammar's Gemma 4 one is disabled upstream
(Gemma writes strings between ``<|"|>`` delimiters, which JSON schema content
cannot express), so those two tags are written here. Gemma 4's forced calls
are standard JSON inside ``<|tool_call>call:NAME...<tool_call|>``, which
transformers' Gemma 4 response template parses (it reads quoted keys and
strings as well as Gemma's own).
"""
from __future__ import annotations

# xgrammar's builtin call formats, by llmhost's syntax name (generation/parsing.call_syntax).
BUILTIN = {"hermes": "qwen_3", "qwen3_5": "qwen_3_5", "llama3": "llama"}
# What goes between two calls (what each family's chat template writes).
SEPARATOR = {"hermes": "\n", "qwen3_5": "\n", "llama3": "; ", "mistral": ", ",
             "mistral_args": "", "gemma4": ""}
# At most one space or newline in a row inside the JSON (small models otherwise
# wander into endless whitespace).
WHITESPACE = 1


def supported(syntax: str | None) -> bool:
    return syntax in SEPARATOR


def _json(schema) -> dict:
    return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": WHITESPACE}


def call_tag(syntax: str, tool: dict) -> dict:
    """The structural tag of one call to `tool` in the family's syntax."""
    fn = tool["function"]
    name, params = fn["name"], fn.get("parameters") or {"type": "object"}
    if syntax in BUILTIN:
        # Without "strict": xgrammar drops the schema of a strict=false tool;
        # llmhost holds every call to its parameters (as for the other syntaxes).
        fn = {k: v for k, v in fn.items() if k != "strict"}
        import xgrammar as xgr  # with the first tool call grammar (engine/constrain.py says why)
        tag = xgr.get_model_structural_tag(
            BUILTIN[syntax], tools=[{"type": "function", "function": fn}],
            tool_choice={"type": "function", "function": {"name": name}},
            reasoning="disabled", max_whitespace_cnt=WHITESPACE)
        return tag.model_dump(mode="json")["format"]
    if syntax == "mistral":
        return {"type": "tag", "begin": f'{{"name": "{name}", "arguments": ', "content": _json(params),
                "end": "}"}
    if syntax == "mistral_args":
        return {"type": "tag", "begin": f"[TOOL_CALLS]{name}[ARGS]", "content": _json(params),
                "end": ""}
    if syntax == "gemma4":
        return {"type": "tag", "begin": f"<|tool_call>call:{name}", "content": _json(params),
                "end": "<tool_call|>"}
    raise ValueError(f"no call grammar for the {syntax!r} syntax")


def calls_format(syntax: str, tools: list[dict], choice, parallel: bool,
                 template_source: str = "") -> dict:
    """Calls only (at least one) to `tools`, or to the named function."""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        tools = [t for t in tools if t["function"]["name"] == name]
        single = True
    else:
        single = not parallel
    calls = {"type": "tags_with_separator", "tags": [call_tag(syntax, t) for t in tools],
             "separator": SEPARATOR[syntax], "at_least_one": True, "stop_after_first": single}
    if syntax == "mistral":
        # v0.3's template writes "[TOOL_CALLS] [", Nemo's and later "[TOOL_CALLS][".
        opening = "[TOOL_CALLS] [" if "[TOOL_CALLS] [" in template_source else "[TOOL_CALLS]["
        return {"type": "sequence", "elements": [{"type": "const_string", "value": opening}, calls,
                                                 {"type": "const_string", "value": "]"}]}
    return calls
