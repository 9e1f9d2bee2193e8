"""Tools, structured outputs and reasoning for one chat-shaped request.

Everything here takes the typed request (generation/request.py: a
ChatRequest with ``messages``, ``tools``, ``tool_choice``, ``response_format``,
...; a CompletionRequest for the extras of /v1/completions) plus the loaded
model entry, so every route runs the same code (generation/plan.py calls it):

1. :func:`chat_plan` decides how the tools reach the prompt. A chat template
   that renders tools *and* whose output llmhost can parse (the model's
   ``response_template``, transformers serve's fallback for its family:
   Qwen 2/2.5/3/3.5, Gemma 4, or llmhost's own for the family its chat template
   belongs to: Llama 3.x, Mistral, see parsing.family_template) gets them
   through ``apply_chat_template(tools=...)`` and the conversation's assistant
   ``tool_calls`` / ``tool`` results in the template's own shape. Any other
   model (SmolLM2, GPT-2, llmhost's fallback template, Gemma 2/3, whose
   templates know no tools) is taught one format in a system turn
   (FALLBACK_TOOLS_PROMPT): Hermes-style
   ``<tool_call>{"name", "arguments"}</tool_call>``, which parsing.HERMES reads;
   earlier calls and results are written in the same format.
2. :meth:`ChatPlan.finish` (once the prompt ids are known) builds the grammar
   and the output parser: ``response_format`` / ``structured_outputs`` alone
   are a compiled JSON schema / regex / grammar; ``tool_choice`` required or
   named is an xgrammar structural tag of calls in the family's own syntax
   (generation/callgrammar.py: Hermes, Qwen 3.5, Llama 3.x, Mistral, Gemma 4) whose
   arguments follow each function's ``parameters``; tools (auto) together with
   ``response_format`` is "calls, or the JSON answer"; a model that thinks in
   ``<think>`` may write its thought first and the constraint holds for what
   follows.
"""
from __future__ import annotations

import copy
import hashlib
import json
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine.sandbox import bounded
from . import callgrammar
from ..engine import constrain
from ..engine.errors import InvalidInput
from .parsing import GENERATED_ONLY, HERMES, OutputParser, call_syntax, markers, response_template
from .prompt import chat_prompt, template_for
from .reasoning import template_variables
from .request import ChatRequest, TextRequest

FALLBACK_TOOLS_PROMPT = (
    "You can call these functions (JSON Schema of each one's arguments):\n{tools}\n\n"
    "To call a function, answer with one line per call and nothing else:\n"
    "<tool_call>\n{{\"name\": \"<function name>\", \"arguments\": {{<arguments as JSON>}}}}\n"
    "</tool_call>\n"
    "Results come back in <tool_response> tags. If no function is needed, answer normally."
)

THINK = ("<think>", "</think>")


@dataclass
class ChatPlan:
    messages: list[dict]                 # for prompt.chat_prompt
    template_tools: list[dict] | None    # for apply_chat_template(tools=...)
    tools: list[dict] = field(default_factory=list)   # active tools (OpenAI form)
    tool_choice: Any = "none"
    parallel: bool = True
    syntax: str | None = None            # the call syntax (parsing.call_syntax) the grammar writes
    source: str = ""                     # the chat template's text
    parse_template: dict | None = None
    request: TextRequest | None = None
    constraint: Any = None
    parser: Callable[[], OutputParser] | None = None

    def finish(self, entry, prompt_ids: list[int], stop_ids, vocab_size: int) -> "ChatPlan":
        """Compile the constraint and set up the output parser for this prompt."""
        prefix = entry.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        thinking = bool(self.parse_template and "reasoning_content" in
                        self.parse_template.get("fields", {})) and _speaks_think(entry)
        self.constraint = _constraint(self, entry, stop_ids, vocab_size, thinking,
                                      _open_thought(prefix))
        if self.parse_template is not None:
            template, tools, prefill = self.parse_template, self.tools, ""
            if template.get("start_anchor_pattern") == GENERATED_ONLY:
                prefill = THINK[0] if _open_thought(prefix) else ""
                prefix = ""
            keep = markers(template, entry.tokenizer)
            self.parser = lambda: OutputParser(template, prefix, tools, prefill, keep)
        return self


# -- 1. tools to the prompt ----------------------------------------------------------

def tool_list(request: ChatRequest) -> list[dict]:
    if request.tools:
        return [{"type": "function", "function": _clean(t["function"])} for t in request.tools]
    return [{"type": "function", "function": _clean(f)} for f in request.functions or []]


def _clean(fn: dict) -> dict:
    out = {"name": fn["name"], "parameters": fn.get("parameters") or {"type": "object",
                                                                        "properties": {}}}
    if fn.get("description"):
        out["description"] = fn["description"]
    if fn.get("strict") is not None:
        out["strict"] = fn["strict"]
    return out


def tool_choice(request: ChatRequest, tools: list[dict]):
    choice = request.tool_choice
    if choice is None and request.function_call is not None:
        fc = request.function_call
        choice = {"type": "function", "function": {"name": fc["name"]}} \
            if isinstance(fc, dict) else fc
    if choice is None:
        choice = "auto" if tools else "none"
    return choice


def _template_source(entry) -> str:
    source = template_for(entry) or getattr(entry.tokenizer, "chat_template", None) or ""
    if isinstance(source, dict):
        source = " ".join(source.values())
    return source


_PROBE = {"type": "function", "function": {
    "name": "llmhost_probe_function", "description": "A probe.",
    "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}
_renders: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _renders_tools(entry) -> bool:
    """Whether the chat template really puts `tools` into the prompt (a template
    may mention tools yet read another variable, like SmolLM3's xml_tools):
    rendered once per tokenizer and template, with a probe function."""
    template = template_for(entry)
    seen = _renders.setdefault(entry.tokenizer, {})
    if template not in seen:
        try:
            text = bounded(lambda: entry.tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hi"}], tools=[_PROBE], chat_template=template,
                tokenize=False, add_generation_prompt=True),
                f"The chat template of model '{entry.id}'", "messages")
            seen[template] = _PROBE["function"]["name"] in text
        except Exception:   # a template that cannot render this is not one to trust with tools
            seen[template] = False
    return seen[template]


def _renders_parallel(entry) -> bool:
    """Whether the chat template writes two calls of one assistant turn (as
    llama.cpp's server decides its `parallel_tool_calls` default): rendered
    once per tokenizer and template, with two probe calls."""
    template = template_for(entry)
    seen = _renders.setdefault(entry.tokenizer, {})
    key = (template, "parallel")
    if key not in seen:
        names = ["llmhost_probe_first", "llmhost_probe_second"]
        calls = [{"id": f"probe{i}abcd", "type": "function",
                  "function": {"name": name, "arguments": {"x": "1"}}}
                 for i, name in enumerate(names)]
        messages = [{"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "", "tool_calls": calls},
                    *({"role": "tool", "tool_call_id": c["id"], "content": "1"} for c in calls)]
        tools = [{**_PROBE, "function": {**_PROBE["function"], "name": n}} for n in names]
        if "tool_responses" in _template_source(entry):
            messages = _fold_tool_responses(messages)
        try:
            text = bounded(lambda: entry.tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=template, tokenize=False,
                add_generation_prompt=True), f"The chat template of model '{entry.id}'",
                "messages")
            seen[key] = all(text.count(n) >= 2 for n in names)   # in the tools and the call
        except Exception:
            seen[key] = False
    return seen[key]


def _speaks_think(entry) -> bool:
    return "<think>" in _template_source(entry) or "<think>" in entry.tokenizer.get_added_vocab()


def _open_thought(prefix: str) -> bool:
    """The prompt already opened a thought the model must close (Qwen3 and
    DeepSeek-R1 templates prefill "<think>\\n")."""
    return prefix.rfind(THINK[0]) > prefix.rfind(THINK[1])


def chat_plan(request: ChatRequest, entry) -> ChatPlan:
    tools = tool_list(request)
    choice = tool_choice(request, tools)
    active = tools if choice != "none" else []
    source = _template_source(entry)
    family = response_template(entry, fallback=False, source=source)
    native = bool(family and "tool_calls" in family.get("fields", {}) and "tools" in source
                  and _renders_tools(entry))
    if native:
        parse = family
        short_ids = call_syntax(family) in ("mistral", "mistral_args")
        messages = [_native_message(m, short_ids) for m in request.messages]
        if "tool_responses" in source:
            messages = _fold_tool_responses(messages)
        template_tools = active or None
    else:
        history = any(m.get("tool_calls") or m["role"] == "tool" for m in request.messages)
        if call_syntax(family) not in (None, "hermes"):
            family = None     # taught the Hermes format: parse that, not the family's own
        parse = family or (HERMES if (active or _speaks_think(entry)) else None)
        messages = _fallback_messages(request.messages, active) if (active or history) \
            else list(request.messages)
        template_tools = None
    if parse is not None and not active and "tool_calls" in parse.get("fields", {}):
        # tool_choice none (or no tools): never parse calls; reasoning still is.
        parse = copy.deepcopy(parse)
        del parse["fields"]["tool_calls"]
    parallel = request.parallel_tool_calls
    if parallel is None:
        # Left out: what the template can write. A model taught llmhost's format
        # (no tools in its template) makes one call unless the client asks for
        # more; a small one otherwise writes call after call until max_tokens.
        parallel = native and _renders_parallel(entry)
    return ChatPlan(messages=messages, template_tools=template_tools, tools=active,
                    tool_choice=choice, parallel=parallel,
                    syntax=call_syntax(parse) if native else "hermes", source=source,
                    parse_template=parse, request=request)


def _arguments(text: str):
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):   # not JSON, or too deep: the text itself
        return text


def _short_id(call_id: str) -> str:
    """A call id as Mistral's templates require (9 letters or digits, else
    they refuse the conversation); the same id always maps to the same one."""
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def _native_message(message: dict, short_ids: bool = False) -> dict:
    """Assistant calls with their arguments as objects, as tool-aware templates
    expect (they `tojson` them)."""
    if short_ids and message.get("tool_call_id"):
        message = {**message, "tool_call_id": _short_id(message["tool_call_id"])}
    if not message.get("tool_calls"):
        return message
    calls = [{"id": _short_id(c["id"]) if short_ids else c["id"], "type": "function",
              "function": {"name": c["function"]["name"],
                           "arguments": _arguments(c["function"]["arguments"])}}
             for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def _fold_tool_responses(messages: list[dict]) -> list[dict]:
    """For templates that read results from the assistant turn itself (Gemma
    4: ``tool_responses`` of the message that made the calls, and the model's
    turn goes on after them): the `tool` messages after an assistant turn with
    calls become that turn's ``tool_responses`` ({name, response})."""
    out: list[dict] = []
    for m in messages:
        last = out[-1] if out else None
        if m["role"] == "tool" and last is not None and last.get("tool_calls"):
            names = {c["id"]: c["function"]["name"] for c in last["tool_calls"]}
            response = _arguments(_text(m.get("content")))
            entry = {"name": names.get(m.get("tool_call_id"), m.get("name") or "unknown"),
                     "response": response}
            out[-1] = {**last, "tool_responses": [*last.get("tool_responses", []), entry]}
        else:
            out.append(m)
    return out


def _text(content) -> str:
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content)
    return content or ""


def _fallback_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The conversation for a template that knows no tools: the tools in a
    system turn (merged into the first system message), earlier calls written
    as the assistant wrote them, results as user turns in <tool_response>."""
    out: list[dict] = []
    for m in messages:
        if m.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                               "arguments": _arguments(c["function"]["arguments"])},
                                              ensure_ascii=False) + "\n</tool_call>"
                for c in m["tool_calls"])
            text = _text(m.get("content"))
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + calls})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": "<tool_response>\n" + _text(m.get("content"))
                        + "\n</tool_response>"})
        else:
            out.append(m)
    if tools:
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        prompt = FALLBACK_TOOLS_PROMPT.format(tools=listing)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": _text(out[0].get("content")) + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# -- 2. the grammar -------------------------------------------------------------------

def _answer_format(request: TextRequest) -> tuple[dict | None, str]:
    """(structural-tag format of the answer, param to blame) from
    response_format / structured_outputs; None when the answer is free text."""
    so = request.structured_outputs
    if so:
        if so.get("json") is not None:
            return ({"type": "json_schema", "json_schema": so["json"], "max_whitespace_cnt": 1},
                    "structured_outputs.json")
        if so.get("regex") is not None:
            return {"type": "regex", "pattern": so["regex"]}, "structured_outputs.regex"
        if so.get("choice") is not None:
            return {"type": "or", "elements": [{"type": "const_string", "value": c}
                                               for c in so["choice"]]}, "structured_outputs.choice"
        return {"type": "grammar", "grammar": so["grammar"]}, "structured_outputs.grammar"
    rf = request.response_format or {}
    if rf.get("type") == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema")
        return ({"type": "json_schema", "json_schema": schema if schema is not None else True,
                 "max_whitespace_cnt": 1}, "response_format.json_schema.schema")
    if rf.get("type") == "json_object":
        return ({"type": "json_schema", "json_schema": {"type": "object"}, "max_whitespace_cnt": 1,
                 "strict": False}, "response_format")
    return None, ""


def _calls_format(plan: ChatPlan) -> dict | None:
    """Calls only, in the family's syntax (generation/callgrammar.py): at least one
    for required / auto with a response_format, exactly the named function when
    one is named; None for a syntax llmhost cannot write (a model's own
    response_template of an unknown family: its calls are parsed, not forced)."""
    if not plan.tools or plan.tool_choice == "none" or not callgrammar.supported(plan.syntax):
        return None
    try:
        return callgrammar.calls_format(plan.syntax, plan.tools, plan.tool_choice, plan.parallel,
                                        plan.source)
    except ValueError as exc:     # xgrammar refused a tool (its own validation)
        raise InvalidInput(f"Invalid value for 'tools': llmhost's grammar library (xgrammar) "
                           f"cannot use it: {exc}", param="tools", code="invalid_grammar")


def _constraint(plan: ChatPlan, entry, stop_ids, vocab_size: int, thinking: bool,
                in_thought: bool):
    answer, param = _answer_format(plan.request)
    # structured_outputs is the grammar of the whole output (vLLM's meaning):
    # it replaces the call grammar; response_format is the answer's format.
    whole = bool(plan.request.structured_outputs)
    calls = None if whole else _calls_format(plan)
    thinking = thinking and not whole
    forced = calls is not None and plan.tool_choice != "auto"
    if forced:
        fmt = calls
    elif answer is not None and calls is not None:     # auto + response_format
        fmt, param = {"type": "or", "elements": [calls, answer]}, param
    elif answer is not None:
        fmt = answer
    else:
        return None
    comp = constrain.compiler(entry.model, entry.tokenizer, vocab_size, stop_ids)
    structural = thinking or fmt is not answer or answer["type"] in ("or",)
    try:
        if not structural:
            if answer["type"] == "json_schema":
                strict = param != "response_format"
                compiled = constrain.json_schema(comp, answer["json_schema"], strict=strict)
            elif answer["type"] == "regex":
                compiled = constrain.regex(comp, answer["pattern"])
            else:
                compiled = constrain.ebnf(comp, answer["grammar"])
        else:
            if thinking:
                thought = {"type": "tag", "begin": "" if in_thought else THINK[0],
                           "content": {"type": "any_text", "excludes": [THINK[1]]},
                           "end": [THINK[1] + "\n\n", THINK[1] + "\n", THINK[1]]}
                fmt = {"type": "sequence", "elements": [
                    thought if in_thought else {"type": "optional", "content": thought}, fmt]}
            compiled = constrain.structural_tag(comp, {"type": "structural_tag", "format": fmt})
    except constrain.GrammarError as exc:
        where = param or "tools"
        raise InvalidInput(f"Invalid value for '{where}': llmhost's grammar library (xgrammar) "
                           f"cannot compile it: {exc}", param=where, code="invalid_grammar")
    return constrain.Constraint(compiled, vocab_size, "tools" if calls else "answer")


def completion_constraint(request: TextRequest, entry, stop_ids, vocab_size: int):
    """response_format / structured_outputs on /v1/completions (an llmhost extra)."""
    plan = ChatPlan(messages=[], template_tools=None, request=request)
    return _constraint(plan, entry, stop_ids, vocab_size, thinking=False, in_thought=False)


def chat_ids(request: ChatRequest, entry, stop_ids, vocab_size: int,
             fits: Callable[[list[int]], Any] | None = None) -> tuple[list[int], ChatPlan]:
    """Prompt ids and the finished tool plan (constraint, parser) of a chat
    request; `fits(ids)` (the context-length check) runs before the grammar
    compiles: cheap checks first."""
    plan = chat_plan(request, entry)
    ids = chat_prompt(entry, plan.messages, tools=plan.template_tools,
                      variables=template_variables(request))
    if fits is not None:
        fits(ids)
    return ids, plan.finish(entry, ids, stop_ids, vocab_size)
