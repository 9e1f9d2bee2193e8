"""The one place that parses model output into content, reasoning and tool
calls, for chat and responses alike.

The parsing itself is transformers' own streaming ``ResponseParser`` (the one
``tokenizer.parse_response`` and ``transformers serve`` use) driven by a
declarative response template: the tokenizer's ``response_template`` when the
model ships one, else the per-family fallback ``transformers serve`` keeps
(Qwen 2/2.5/3/3.5 with ``<tool_call>`` and ``<think>``, Gemma 4). For every
other model we only add one more *template* (no parser code): HERMES below,
the ``<tool_call>{"name", "arguments"}</tool_call>`` + ``<think>`` format that
llmhost also teaches models whose chat template knows no tools
(engine/tools.py), so their calls parse the same way. Llama 3.x JSON calls,
Mistral ``[TOOL_CALLS]`` and Gemma 2/3 are not parsed (no template in
transformers; see the README).

Streaming needs nothing extra: the parser holds back text that may still be
the start of a delimiter (like a stop string) and releases a tool call only
when its closing tag arrives; each call then goes out as OpenAI's
``delta.tool_calls`` pieces (id, type and name first, the arguments after).
"""
from __future__ import annotations

import json
import logging
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

# Pieces the arguments of one streamed call are cut into (OpenAI streams them
# in many small pieces; clients concatenate).
ARGUMENT_PIECE = 16


def response_template(entry, fallback: bool) -> dict | None:
    """The template that parses this model's output: its own, transformers'
    fallback for its family, HERMES when `fallback` (the model was taught our
    call format, or its template speaks <think>/<tool_call>), else None (plain
    text, nothing parsed)."""
    if ResponseParser is None:  # pragma: no cover
        return None
    tokenizer = entry.tokenizer
    own = getattr(tokenizer, "response_template", None)
    if own:
        return own
    try:
        from transformers.cli.serving.utils import get_response_template
        family = get_response_template(tokenizer, entry.model)
    except Exception:  # pragma: no cover - transformers without serving helpers
        family = None
    if family is not None:
        return family
    return HERMES if fallback else None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class Parsed:
    """What one piece of generated text turned into."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)   # chat chunk deltas, with "index"


class OutputParser:
    """One choice's parser. If the output does not parse (a call with broken
    JSON), the rest of it is passed on as plain content rather than lost."""

    def __init__(self, template: dict, prefix: str, tools: list[dict] | None,
                 prefill: str = "") -> None:
        self.parser = ResponseParser(template, prefix=prefix, tools=tools or None)
        if prefill:   # a thought the prompt opened (HERMES has no anchor to find it)
            self.parser.feed(prefill)
        self.calls = 0
        self.started = False
        self.raw = ""          # text fed but not yet released (for the broken case)
        self.broken = False

    def feed(self, text: str) -> Parsed:
        if self.broken:
            return Parsed(content=text)
        try:
            events = self.parser.feed(text)
        except Exception as exc:
            return self._break(text, exc)
        return self._events(events, text)

    def finish(self) -> Parsed:
        if self.broken:
            return Parsed()
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
                out.tool_calls += self._call_deltas(ev.get("value"))
                self.raw = ""
        return out

    def _call_deltas(self, value) -> list[dict]:
        fn = value.get("function") if isinstance(value, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            return []
        args = fn.get("arguments", {})
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
