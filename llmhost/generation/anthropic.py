"""Anthropic's Messages API, both ways, as a translation onto the chat path
(DESIGN rule 17, as generation/conversation.py does for the Responses API):

* :func:`chat_body` turns a Messages request (``system``, content blocks,
  ``tools`` with ``input_schema``, ``tool_choice`` auto / any / tool / none,
  ``stop_sequences``, ``thinking``) into an OpenAI chat request body, which
  /v1/chat/completions' schema, prompt builder, grammars and engine then run;
* :class:`MessageBuilder` turns the run's deltas (text, reasoning, tool call
  pieces) into Anthropic's stream events (``message_start``,
  ``content_block_start`` / ``_delta`` / ``_stop``, ``message_delta``,
  ``message_stop``) and, from the same events, the final ``message`` object,
  so a streamed and a plain answer are one code path.
"""
from __future__ import annotations

import json
import uuid

from ..engine.errors import InvalidInput, unsupported

# finish_reason of the chat path -> stop_reason
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# Anthropic's built-in (server or client-defined) tools have a dated `type`; only
# custom tools (no type, or "custom") are functions this server's models can call.
CUSTOM = (None, "custom")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _text(content, where: str) -> str:
    """A string, or text blocks joined (tool results and system prompts)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise InvalidInput(f"Invalid value for '{where}': must be a string or an array of content "
                           "blocks.", param=where)
    texts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text" \
                or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else None
            raise InvalidInput(f"Invalid value for '{where}[{j}]': only text blocks are supported "
                               f"here (got type {kind!r}).", param=f"{where}[{j}].type")
        texts.append(block["text"])
    return "\n".join(texts)


def _user_turn(content, where: str) -> list[dict]:
    """A user turn's blocks: text and image blocks become user messages (image
    blocks as OpenAI image_url parts, for vision-language models), each
    tool_result a `tool` message answering its call, in their order."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[dict] = []
    pending: list[dict] = []      # OpenAI content parts of the user message being built

    def flush():
        if pending:
            if all(p["type"] == "text" for p in pending):
                out.append({"role": "user", "content": "\n".join(p["text"] for p in pending)})
            else:
                out.append({"role": "user", "content": list(pending)})
            pending.clear()

    for j, block in enumerate(content):
        kind = block.get("type")
        at = f"{where}[{j}]"
        if kind == "text":
            pending.append({"type": "text", "text": _text([block], where)})
        elif kind == "image":
            pending.append({"type": "image_url", "image_url": {"url": _image_url(block, at)}})
        elif kind == "tool_result":
            flush()
            if not isinstance(block.get("tool_use_id"), str):
                raise InvalidInput(f"Missing required parameter: '{at}.tool_use_id'.",
                                   param=f"{at}.tool_use_id")
            text = _text(block.get("content"), f"{at}.content")
            if block.get("is_error"):
                text = f"Error: {text}"
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        else:
            raise InvalidInput(f"Invalid value for '{at}.type': content blocks of type {kind!r} "
                               "are not supported in a user turn (use 'text', 'image' or "
                               "'tool_result').", param=f"{at}.type")
    flush()
    return out


def _image_url(block: dict, at: str) -> str:
    """An Anthropic image block's source as the URL of an OpenAI image_url part:
    base64 data becomes a data URL; a url source stays a URL (fetched only
    where LLMHOST_IMAGE_URLS allows, generation/images.py)."""
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64" \
            and isinstance(source.get("data"), str) and isinstance(source.get("media_type"), str):
        return f"data:{source['media_type']};base64,{source['data']}"
    if isinstance(source, dict) and source.get("type") == "url" \
            and isinstance(source.get("url"), str):
        return source["url"]
    raise InvalidInput(f"Invalid value for '{at}.source': give {{\"type\": \"base64\", "
                       "\"media_type\": ..., \"data\": ...} or {\"type\": \"url\", \"url\": ...}.",
                       param=f"{at}.source")


def _assistant_turn(content, where: str) -> dict:
    """An assistant turn: its text, and its tool_use blocks as tool_calls;
    thinking blocks of earlier turns are dropped (chat templates drop them too)."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts, calls = [], []
    for j, block in enumerate(content):
        kind = block.get("type")
        at = f"{where}[{j}]"
        if kind == "text":
            texts.append(_text([block], where))
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise InvalidInput(f"Invalid value for '{at}': a tool_use block needs 'id' and "
                                   "'name'.", param=at)
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"],
                "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise InvalidInput(f"Invalid value for '{at}.type': content blocks of type {kind!r} are "
                               "not supported in an assistant turn.", param=f"{at}.type")
    message: dict = {"role": "assistant", "content": "\n".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return message


def _messages(args: dict) -> list[dict]:
    out: list[dict] = []
    if args.get("system") is not None:
        system = _text(args["system"], "system")
        if system:
            out.append({"role": "system", "content": system})
    for i, message in enumerate(args["messages"]):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise InvalidInput(f"Invalid value for '{where}.role': must be 'user' or 'assistant'.",
                               param=f"{where}.role")
        content = message.get("content")
        if not isinstance(content, (str, list)):
            raise InvalidInput(f"Invalid value for '{where}.content': must be a string or an array "
                               "of content blocks.", param=f"{where}.content")
        for j, block in enumerate(content if isinstance(content, list) else []):
            if not isinstance(block, dict):
                raise InvalidInput(f"Invalid value for '{where}.content[{j}]': must be a content "
                                   "block object.", param=f"{where}.content[{j}]")
        if message["role"] == "user":
            out += _user_turn(content, f"{where}.content")
        else:
            out.append(_assistant_turn(content, f"{where}.content"))
    return out


def _tools(tools) -> list[dict]:
    out = []
    for i, tool in enumerate(tools or []):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidInput(f"Invalid value for '{where}': must be an object.", param=where)
        if tool.get("type") not in CUSTOM:
            raise unsupported(f"{where}.type", f": Anthropic's built-in tool "
                                f"{tool.get('type')!r} runs on Anthropic's servers; give custom "
                                "tools with a name and an input_schema")
        if not isinstance(tool.get("name"), str):
            raise InvalidInput(f"Missing required parameter: '{where}.name'.", param=f"{where}.name")
        function = {"name": tool["name"],
                    "parameters": tool.get("input_schema") or {"type": "object", "properties": {}}}
        if tool.get("description"):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice) -> tuple[object, bool | None]:
    """(OpenAI tool_choice, parallel_tool_calls) of Anthropic's tool_choice."""
    if choice is None:
        return None, None
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise InvalidInput("Invalid value for 'tool_choice.type': must be one of auto, any, tool, "
                           "none.", param="tool_choice.type")
    kind = choice["type"]
    parallel = False if choice.get("disable_parallel_tool_use") else None
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise InvalidInput("Missing required parameter: 'tool_choice.name'.",
                               param="tool_choice.name")
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    return {"auto": "auto", "any": "required", "none": "none"}[kind], parallel


def chat_body(args: dict) -> dict:
    """The OpenAI chat request body that runs the Messages request `args` (as
    loaded by schemas/anthropic.py)."""
    body: dict = {"model": args["model"], "messages": _messages(args)}
    if args.get("max_tokens") is not None:
        body["max_tokens"] = args["max_tokens"]
    for name in ("temperature", "top_p", "top_k"):
        if args.get(name) is not None:
            body[name] = args[name]
    if args.get("stop_sequences"):
        body["stop"] = args["stop_sequences"]
    tools = _tools(args.get("tools"))
    if tools:
        body["tools"] = tools
    choice, parallel = _tool_choice(args.get("tool_choice"))
    if tools and choice is not None:
        body["tool_choice"] = choice
    if tools and parallel is not None:
        body["parallel_tool_calls"] = parallel
    thinking = args.get("thinking") or {}
    output = args.get("output_config") or {}
    if thinking.get("type") == "disabled":
        body["reasoning_effort"] = "none"   # templates with an enable_thinking switch
    elif output.get("effort"):
        body["reasoning_effort"] = output["effort"]
    fmt = output.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" \
                or not isinstance(fmt.get("schema"), dict):
            raise InvalidInput("Invalid value for 'output_config.format': must be {\"type\": "
                               "\"json_schema\", \"schema\": {...}}.", param="output_config.format")
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": fmt["schema"]}}
    return body


# -- the run -> events and the message --------------------------------------------------

class MessageBuilder:
    """Anthropic's events of one answer as the chat path's deltas come, and the
    message they add up to (:attr:`message`)."""

    def __init__(self, model: str, prompt_tokens: int, cached_tokens: int = 0) -> None:
        # Anthropic counts prompt tokens read from a cache apart from input_tokens;
        # llmhost's prefix cache (engine/prefixcache.py) is that cache.
        self.message = {"id": new_id("msg"), "type": "message", "role": "assistant",
                        "model": model, "content": [], "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": prompt_tokens - cached_tokens,
                                  "output_tokens": 0, "cache_creation_input_tokens": 0,
                                  "cache_read_input_tokens": cached_tokens}}
        self.open: str | None = None        # the kind of the block being written
        self.calls: dict[int, dict] = {}    # chat call index -> its tool_use block
        self.arguments: dict[int, str] = {}

    def start(self) -> list[dict]:
        return [{"type": "message_start", "message": {**self.message, "content": []}},
                {"type": "ping"}]

    def _block(self, kind: str, block: dict) -> list[dict]:
        events = self._close()
        self.message["content"].append(block)
        self.open = kind
        shown = {**block, "input": {}} if kind == "tool_use" else dict(block)
        events.append({"type": "content_block_start", "index": self._index,
                       "content_block": shown})
        return events

    @property
    def _index(self) -> int:
        return len(self.message["content"]) - 1

    def _close(self) -> list[dict]:
        if self.open is None:
            return []
        events = []
        block = self.message["content"][-1]
        if self.open == "thinking":    # no signature: nothing signs a local model's thought
            events.append({"type": "content_block_delta", "index": self._index,
                           "delta": {"type": "signature_delta", "signature": ""}})
        self.open = None
        if block["type"] == "tool_use":
            number = next(n for n, b in self.calls.items() if b is block)
            text = self.arguments[number]
            try:
                block["input"] = json.loads(text) if text.strip() else {}
            except ValueError:
                block["input"] = {}
        events.append({"type": "content_block_stop", "index": self._index})
        return events

    def feed(self, delta) -> list[dict]:
        """Events of one ChoiceDelta (generation/run.py)."""
        events: list[dict] = []
        if delta.reasoning:
            if self.open != "thinking":
                events += self._block("thinking", {"type": "thinking", "thinking": "",
                                                   "signature": ""})
            self.message["content"][-1]["thinking"] += delta.reasoning
            events.append({"type": "content_block_delta", "index": self._index,
                           "delta": {"type": "thinking_delta", "thinking": delta.reasoning}})
        if delta.text:
            if self.open != "text":
                events += self._block("text", {"type": "text", "text": ""})
            self.message["content"][-1]["text"] += delta.text
            events.append({"type": "content_block_delta", "index": self._index,
                           "delta": {"type": "text_delta", "text": delta.text}})
        for call in delta.tool_calls or []:
            number = call.get("index", 0)
            function = call.get("function") or {}
            if number not in self.calls:
                block = {"type": "tool_use", "id": (call.get("id") or new_id("toolu")),
                         "name": function.get("name") or "", "input": {}}
                events += self._block("tool_use", block)
                self.calls[number], self.arguments[number] = block, ""
            piece = function.get("arguments") or ""
            if piece:
                self.arguments[number] += piece
                if self.message["content"][-1] is self.calls[number]:
                    events.append({"type": "content_block_delta", "index": self._index,
                                   "delta": {"type": "input_json_delta", "partial_json": piece}})
        return events

    def end(self, finish_reason: str | None, stop_sequence: str | None,
            output_tokens: int) -> list[dict]:
        """The closing events; the message is complete after them."""
        events = self._close()
        reason = STOP_REASONS.get(finish_reason or "stop", "end_turn")
        if reason == "end_turn" and stop_sequence is not None:
            reason = "stop_sequence"
        self.message["stop_reason"] = reason
        self.message["stop_sequence"] = stop_sequence if reason == "stop_sequence" else None
        self.message["usage"]["output_tokens"] = output_tokens
        events.append({"type": "message_delta",
                       "delta": {"stop_reason": reason,
                                 "stop_sequence": self.message["stop_sequence"]},
                       "usage": {"output_tokens": output_tokens}})
        events.append({"type": "message_stop"})
        return events
