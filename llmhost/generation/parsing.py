"""The one place that parses model output into content, reasoning and tool
calls, for chat and responses alike.

The parsing itself is transformers' own streaming ``ResponseParser`` (the one
``tokenizer.parse_response`` and ``transformers serve`` use) driven by a
declarative response template (:func:`response_template`): the tokenizer's
``response_template`` when the model ships one; else the family the chat
template's text shows (:func:`family_template`: transformers serve's Qwen 3.5
or Gemma 4 template, or one of ours below); else transformers serve's
fallback for the model type (Qwen 2/2.5/3 ``<tool_call>`` + ``<think>``);
else HERMES. Ours are only *templates* for the same parser:

* LLAMA3: Llama 3.1/3.2/3.3 JSON calls ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``, several separated by ``;`` or newlines.
  A regex cannot find where a JSON object ends, so a call closes at a ``}``
  followed by a separator and the next call's ``{"name":``, or at the end of
  the output; that sequence inside a string argument would cut a call short
  (the output then passes on as text, see :class:`OutputParser`).
* MISTRAL: ``[TOOL_CALLS]`` and a JSON list of ``{"name", "arguments"}``
  (Mistral 7B v0.3, Nemo, Small 3/3.1); MISTRAL_ARGS: the newer
  ``[TOOL_CALLS]name[ARGS]{...}`` form (Small 3.2, Magistral, Devstral).
* HERMES: ``<tool_call>{"name", "arguments"}</tool_call>`` + ``<think>``, the
  format llmhost also teaches models whose chat template knows no tools
  (generation/tools.py; Gemma 2/3 among them), so their calls parse the same way.

Parser code of our own covers only what a template cannot say:
:func:`markers` keeps the family's delimiters that are special tokens (Mistral's
``[TOOL_CALLS]``, Llama's ``<|python_tag|>``, Gemma 4's ``<|tool_call>``) in
the decoded text the parser reads, and :class:`OutputParser` accepts Llama's
``parameters`` as ``arguments`` and a region holding a list of calls (Mistral).

Streaming needs nothing extra: the parser holds back text that may still be
the start of a delimiter (like a stop string) and releases a tool call only
when its closing tag arrives; each call then goes out as OpenAI's
``delta.tool_calls`` pieces (id, type and name first, the arguments after).
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field

try:  # transformers >= 5 (response templates); older versions parse nothing
    from transformers.utils.chat_parsing.response_parser import ResponseParser
except ImportError:  # pragma: no cover
    ResponseParser = None

log = logging.getLogger("llmhost")

# Hermes-style calls (NousResearch Hermes 2 Pro, Qwen 2.5, SmolLM3 ...) and
# a <think> block, with no anchor in the prompt: the generated text only.
HERMES = {
    "defaults": {"role": "assistant"},
    "start_anchor_pattern": r"\Z",     # the prompt holds nothing of the answer (see OutputParser)
    "fields": {
        "reasoning_content": {"open": "<think>", "close": "</think>", "content": "text"},
        "tool_calls": {
            "open_pattern": r"\s*<tool_call>",
            "close": "</tool_call>",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"content": "text"},
    },
}

# The templates below see the generated text only (no anchor in the prompt).
GENERATED_ONLY = r"\Z"

# Llama 3.x: see the module docstring for where a call ends. (A region with no
# close, or whose close never comes, closes at the end of the output; a "|\Z"
# in a close pattern would hide a partial match behind it.)
LLAMA3 = {
    "defaults": {"role": "assistant"},
    "start_anchor_pattern": GENERATED_ONLY,
    "fields": {
        "tool_calls": {
            # A call is {"name": "...", "parameters" (or "arguments"): ...}: a JSON
            # answer that merely starts with a "name" key stays text.
            "open_pattern": r'\s*(?:<\|python_tag\|>\s*)?'
                            r'(?=\{\s*"name"\s*:\s*"[^"]*"\s*,\s*"(?:parameters|arguments)"\s*:)',
            "close_pattern": r'(?<=\})\s*(?:;\s*|\n\s*)(?=\{\s*"name"\s*:|<\|python_tag\|>)',
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"content": "text"},
    },
}

# Mistral v3 (7B v0.3, Nemo, Small 3/3.1): one JSON list after [TOOL_CALLS],
# up to the end of the output (no close).
MISTRAL = {
    "defaults": {"role": "assistant"},
    "start_anchor_pattern": GENERATED_ONLY,
    "fields": {
        "tool_calls": {
            "open": "[TOOL_CALLS]",
            "content": "json",
            "transform": {"type": "function",
                          "function": {"name": "{name}", "arguments": "{arguments}"}},
            "transform_each": True,
        },
        "content": {"content": "text"},
    },
}

# Mistral tokenizer v11+ (Small 3.2, Magistral, Devstral): [TOOL_CALLS]name[ARGS]{...}
# per call (an optional [CALL_ID]id before [ARGS]).
MISTRAL_ARGS = {
    "defaults": {"role": "assistant"},
    "start_anchor_pattern": GENERATED_ONLY,
    "fields": {
        "tool_calls": {
            "open_pattern": r"\[TOOL_CALLS\](?P<name>[A-Za-z0-9_.\-]+)"
                            r"(?:\[CALL_ID\][A-Za-z0-9]+)?\[ARGS\]",
            "close_pattern": r"(?=\[TOOL_CALLS\])",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}},
        },
        "content": {"content": "text"},
    },
}


@functools.lru_cache(maxsize=1)
def _fallback_templates() -> dict:
    """transformers serve's fallback response templates by model type: the
    ``_RESPONSE_TEMPLATE_FALLBACKS`` table of ``transformers/cli/serving/utils.py``,
    read from the file as a literal (``ast.literal_eval``, 0.6 ms) instead of
    running the module. Running it imported its package first (``cli/serving/__init__.py``:
    the FastAPI server of ``transformers serve``, 14 MiB), and itself imports
    starlette, python-multipart, tqdm and huggingface_hub's cache scanner: 10-17
    ms of a model's first chat (thirty-third session, docs/performance.md). Empty,
    and logged, where that table is gone or no longer a literal (every family it
    knows, Qwen among them, would then fall back to the Hermes format:
    tests/test_tool_families.py checks the table read is transformers' own)."""
    import ast

    import transformers

    path = os.path.join(os.path.dirname(transformers.__file__), "cli", "serving", "utils.py")
    try:
        with open(path, encoding="utf-8") as fh:   # the assignment, to its closing brace at column 0
            found = re.search(r"^_RESPONSE_TEMPLATE_FALLBACKS = (\{.*?^\})$", fh.read(), re.M | re.S)
        return ast.literal_eval(found[1])
    except (OSError, TypeError, SyntaxError, ValueError) as exc:   # TypeError: not found (None[1])
        log.warning("transformers serve's fallback response templates could not be read from %s: %r",
                    path, exc)
        return {}


def _transformers_family(model_type: str) -> dict | None:
    """transformers serve's fallback template of a model type (as its
    ``get_response_template`` picks it for a tokenizer without its own), or None."""
    return next((v for types, v in _fallback_templates().items() if model_type in types), None)


def family_template(source: str) -> dict | None:
    """The parse template of a chat template's tool-call family, known by the
    markers the template writes (more reliable than the model type: Qwen3-Coder
    is a qwen3_moe that writes Qwen 3.5's XML calls); None when it is none we know."""
    if "tools" not in source:
        return None
    if "<function=" in source and "<parameter=" in source and "<tool_call>" in source:
        return _transformers_family("qwen3_5")
    if "<|tool_call>" in source and "<tool_call|>" in source:
        return _transformers_family("gemma4")
    if "[TOOL_CALLS]" in source:
        return MISTRAL_ARGS if "[ARGS]" in source else MISTRAL
    if "<|start_header_id|>" in source and '{"name": ' in source and '"parameters": ' in source:
        return LLAMA3     # Meta's JSON calls (Functionary, also Llama 3-based, writes <function=...>)
    return None


def call_syntax(template: dict | None) -> str | None:
    """Which family's call syntax a parse template reads (the grammar writes
    the same one, generation/callgrammar.py): hermes, qwen3_5, gemma4, llama3,
    mistral, mistral_args; None for a template we do not know."""
    field_ = (template or {}).get("fields", {}).get("tool_calls")
    if not field_:
        return None
    opener = field_.get("open") or field_.get("open_pattern") or ""
    if opener == LLAMA3["fields"]["tool_calls"]["open_pattern"]:
        return "llama3"
    if opener == "[TOOL_CALLS]":
        return "mistral"
    if opener.startswith(r"\[TOOL_CALLS\]"):
        return "mistral_args"
    if "<function=" in opener and field_.get("content") == "xml-inline":
        return "qwen3_5"
    if "tool_call>call:" in opener:
        return "gemma4"
    if "<tool_call>" in opener and field_.get("content") == "json":
        return "hermes"
    return None


def markers(template: dict, tokenizer) -> dict[int, str]:
    """{id: text} of the special tokens the template's tool-call and reasoning
    delimiters are made of: decoding skips special tokens, but the parser must
    see these ([TOOL_CALLS], <|python_tag|>, Gemma 4's <|tool_call>)."""
    fields = {k: v for k, v in template.get("fields", {}).items() if k != "content"}
    text = json.dumps(fields)
    keep: dict[int, str] = {}
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        content = getattr(token, "content", "")
        if content and getattr(token, "special", False) and (
                json.dumps(content)[1:-1] in text or json.dumps(re.escape(content))[1:-1] in text):
            keep[int(token_id)] = content
    return keep


# Pieces the arguments of one streamed call are cut into (OpenAI streams them
# in many small pieces; clients concatenate).
ARGUMENT_PIECE = 16


def response_template(entry, fallback: bool, source: str = "") -> dict | None:
    """The template that parses this model's output: its own, the one of the
    family its chat template `source` belongs to (family_template),
    transformers' fallback for its model type, HERMES when the chat template
    writes Hermes <tool_call> JSON itself (Hermes 2 Pro / 3 on a Llama or
    Mistral body) or when `fallback` (the model was taught our call format, or
    its template speaks <think>/<tool_call>), else None (plain text, nothing
    parsed)."""
    if ResponseParser is None:  # pragma: no cover
        return None
    tokenizer = entry.tokenizer
    own = getattr(tokenizer, "response_template", None)
    if own:
        return own
    family = family_template(source)
    if family is not None:
        return family
    family = _transformers_family(getattr(entry.model.config, "model_type", ""))
    if family is not None:
        return family
    if "tools" in source and "<tool_call>" in source and re.search(r'\{\\?"name\\?":', source):
        return HERMES     # <tool_call> + {"name": ...}: not GLM's <arg_key> nor Qwen 3.5's XML
    return HERMES if fallback else None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class Parsed:
    """What one piece of generated text turned into."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)   # chat chunk deltas, with "index"


class JsonStrings:
    """Hermes calls close at the first ``</tool_call>``, and transformers'
    parser looks for it in the raw text, also inside a JSON string argument
    (a tool whose argument is that tag would lose its call). This filter,
    fed the text before the parser, writes every ``/`` inside a JSON string of
    a call as a backslash and ``/``, which JSON reads as the same string, so the tag inside
    an argument no longer looks like one. Character by character, so it holds
    across streamed pieces."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    THINK, THOUGHT = "<think>", "</think>"    # no calls inside a thought (its text stays as is)

    def __init__(self) -> None:
        self.in_call = self.in_string = self.escaped = self.in_thought = False
        self.tail = ""      # the last characters outside strings, to spot the tags

    def __call__(self, text: str) -> str:
        out = []
        for ch in text:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                elif ch == "/":
                    ch = "\\/"
                out.append(ch)
                continue
            out.append(ch)
            self.tail = (self.tail + ch)[-len(self.CLOSE):]
            if self.in_thought:
                self.in_thought = not self.tail.endswith(self.THOUGHT)
            elif not self.in_call:
                self.in_call = self.tail.endswith(self.OPEN)
                self.in_thought = self.tail.endswith(self.THINK)
            elif ch == '"':
                self.in_string = True
            elif self.tail.endswith(self.CLOSE):
                self.in_call = False
        return "".join(out)


class OutputParser:
    """One choice's parser. If the output does not parse (a call with broken
    JSON), the rest of it is passed on as plain content rather than lost.

    A tail that may be the start of a closing tag (``</tool_``) is held back
    until the next piece says what it is: when the answer ends there (max_tokens
    cut the closing tag of a call whose JSON is whole), the call still parses
    without it, and the finish_reason (``length``) says what happened."""

    def __init__(self, template: dict, prefix: str, tools: list[dict] | None,
                 prefill: str = "", keep: dict[int, str] | None = None) -> None:
        self.parser = ResponseParser(template, prefix=prefix, tools=tools or None)
        self.markers = keep or {}    # special tokens the decoded text must keep (see markers())
        self.escape = JsonStrings() if call_syntax(template) == "hermes" else None
        if prefill:   # a thought the prompt opened (HERMES has no anchor to find it)
            self.parser.feed(prefill)
        self.calls = 0
        self.started = False
        self.raw = ""          # text fed but not yet released (for the broken case)
        self.broken = False
        # a field's "close" is one tag or a list of them (transformers 5.25's Gemma 4 content)
        self.closers = [c for f in template.get("fields", {}).values() if isinstance(f, dict)
                        for c in ([f["close"]] if isinstance(f.get("close"), str)
                                  else f.get("close") or [])]
        self.held = ""         # a tail that may start a closing tag

    def _hold(self, text: str) -> tuple[str, str]:
        """(text to feed now, tail that is a proper prefix of a closing tag)."""
        for size in range(min(len(text), max(map(len, self.closers), default=1) - 1), 0, -1):
            if any(c.startswith(text[-size:]) and len(c) > size for c in self.closers):
                return text[:-size], text[-size:]
        return text, ""

    def feed(self, text: str) -> Parsed:
        if self.broken:
            return Parsed(content=text)
        text, self.held = self._hold(self.held + text)
        try:
            events = self.parser.feed(self.escape(text) if self.escape else text)
        except Exception as exc:
            return self._break(text, exc)
        return self._events(events, text)

    def finish(self) -> Parsed:
        if self.broken:
            return Parsed(content=self.held)
        if self.held:
            saved, held, self.held = copy.deepcopy(self.parser), self.held, ""
            try:
                events = self.parser.feed(held)
                _, more = self.parser.finalize()
                return self._events(events + more, held)
            except Exception:        # a cut closing tag: finish without it
                self.parser = saved
        try:
            _, events = self.parser.finalize()
        except Exception as exc:
            return self._break("", exc)
        return self._events(events, "")

    def _break(self, text: str, exc: Exception) -> Parsed:
        log.info("model output did not parse (%s); passing it on as text", exc)
        self.broken = True
        out, self.raw = self.raw + text, ""
        return Parsed(content=out)

    def _events(self, events: list[dict], text: str) -> Parsed:
        self.raw += text
        out = Parsed()
        for ev in events:
            name = ev.get("field")
            if ev["type"] == "region_chunk" and not ev.get("dirty"):
                if name in ("reasoning_content", "thinking"):
                    out.reasoning += ev["text"]
                elif name == "content":
                    # Content starts at its first non-blank character (after a
                    # thought or between calls), streamed or not.
                    text = ev["text"] if self.started else ev["text"].lstrip()
                    self.started = self.started or bool(text)
                    out.content += text
                self.raw = ""
            elif ev["type"] == "region_close" and name == "tool_calls":
                value = ev.get("value")     # one call, or a list of them (Mistral)
                for call in value if isinstance(value, list) else [value]:
                    out.tool_calls += self._call_deltas(call)
                self.raw = ""
        return out

    def _call_deltas(self, value) -> list[dict]:
        fn = value.get("function") if isinstance(value, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            return []
        args = fn.get("arguments", fn.get("parameters", {}))   # Llama 3 writes "parameters"
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        index, self.calls = self.calls, self.calls + 1
        deltas = [{"index": index, "id": new_call_id(), "type": "function",
                   "function": {"name": fn["name"], "arguments": ""}}]
        for start in range(0, len(args), ARGUMENT_PIECE):
            deltas.append({"index": index,
                           "function": {"arguments": args[start:start + ARGUMENT_PIECE]}})
        return deltas


def join_calls(calls: list[dict], deltas: list[dict]) -> list[dict]:
    """Fold streamed tool-call deltas into whole calls (the non-streamed form)."""
    for delta in deltas:
        index = delta["index"]
        while len(calls) <= index:
            calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call = calls[index]
        if "id" in delta:
            call["id"] = delta["id"]
        fn = delta.get("function") or {}
        if fn.get("name"):
            call["function"]["name"] = fn["name"]
        call["function"]["arguments"] += fn.get("arguments") or ""
    return calls
