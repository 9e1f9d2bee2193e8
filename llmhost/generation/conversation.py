"""The Responses API's items, both ways: a request (instructions, input items,
tools, text.format, ...) becomes the chat-shaped arguments that
/v1/chat/completions runs, so both routes share one prompt path, one tool and
structured-output path and one engine; a chat choice becomes output items.

Items are kept in the shapes the API returns them in (OpenAI's `ItemResource`
objects, with ids), which is also how they are stored.
"""
from __future__ import annotations

import uuid

from ..engine.errors import InvalidInput

# Roles of input messages. Assistant messages come back as output_text parts.
ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")
# Built-in tools run by OpenAI's servers; llmhost has none of them.
FUNCTION = "function"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- request items -> stored items ---------------------------------------------------

def _text_of(content, where: str) -> str:
    """A message's text: a string, or text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidInput(f"Invalid value for '{where}': must be a string or an array of content "
                           "parts.", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in TEXT_PARTS:
            raise InvalidInput(f"Invalid value for '{where}[{j}].text': must be a string.",
                               param=f"{where}[{j}].text")
        else:
            raise InvalidInput(f"Invalid value for '{where}[{j}].type': this server's models take text "
                               f"only; content parts of type {kind!r} are not supported (use "
                               "'input_text').", param=f"{where}[{j}].type")
    return "\n".join(texts)


def _image_parts(content, where: str) -> list[dict] | None:
    """A message's `input_text` and `input_image` parts when it holds an image
    (each image checked now, so a bad one is a 400 naming its part: generation/
    images.py), else None."""
    if not isinstance(content, list) or not any(
            isinstance(p, dict) and p.get("type") == "input_image" for p in content):
        return None
    from ..config import settings
    from .images import load_image

    parts = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "input_image":
            if not isinstance(part.get("image_url"), str):
                raise InvalidInput(f"Invalid value for '{where}[{j}].image_url': give the image "
                                   "as a data URL or an http(s) URL (file ids are an OpenAI "
                                   "service).", param=f"{where}[{j}].image_url")
            load_image(part["image_url"], f"{where}[{j}].image_url", settings())
            parts.append({"type": "input_image", "image_url": part["image_url"],
                          "detail": part.get("detail") or "auto"})
        elif isinstance(part, dict) and part.get("type") in TEXT_PARTS and isinstance(
                part.get("text"), str):
            parts.append({"type": "input_text", "text": part["text"]})
        else:
            raise InvalidInput(f"Invalid value for '{where}[{j}]': a part of a message with "
                               "images must be an input_text or input_image part.",
                               param=f"{where}[{j}]")
    return parts


def message_item(role: str, text: str, item_id: str | None = None,
                 status: str = "completed", parts: list[dict] | None = None) -> dict:
    if role == "assistant":
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    else:
        content = parts or [{"type": "input_text", "text": text}]
    return {"id": item_id or new_id("msg"), "type": "message", "role": role, "status": status,
            "content": content}


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (key != "arguments" and not value):
        raise InvalidInput(f"Missing required parameter: '{where}.{key}' (a string).",
                           param=f"{where}.{key}")
    return value


def input_items(value) -> list[dict]:
    """The request's `input` as stored items; unknown item types and content
    that is not text are a 400 naming the item."""
    if isinstance(value, str):
        return [message_item("user", value)]
    if not isinstance(value, list):
        raise InvalidInput("Invalid value for 'input': must be a string or an array of input items.",
                           param="input")
    items = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidInput(f"Invalid value for '{where}': must be an object.", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        item_id = item.get("id") if isinstance(item.get("id"), str) and item.get("id") else None
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise InvalidInput(f"Invalid value for '{where}.role': must be one of "
                                   f"{', '.join(ROLES)}.", param=f"{where}.role")
            if "content" not in item:
                raise InvalidInput(f"Missing required parameter: '{where}.content'.",
                                   param=f"{where}.content")
            parts = _image_parts(item["content"], f"{where}.content") if role == "user" else None
            text = "" if parts else _text_of(item["content"], f"{where}.content")
            items.append(message_item(role, text, item_id, parts=parts))
        elif kind == "function_call":
            items.append({"id": item_id or new_id("fc"), "type": "function_call",
                          "call_id": _string(item, "call_id", where),
                          "name": _string(item, "name", where),
                          "arguments": _string(item, "arguments", where), "status": "completed"})
        elif kind == "function_call_output":
            output = item.get("output")
            text = _text_of(output, f"{where}.output") if output is not None else None
            if text is None:
                raise InvalidInput(f"Missing required parameter: '{where}.output'.",
                                   param=f"{where}.output")
            items.append({"id": item_id or new_id("fco"), "type": "function_call_output",
                          "call_id": _string(item, "call_id", where), "output": text,
                          "status": "completed"})
        elif kind == "reasoning":
            # Earlier thoughts travel with the conversation (the Agents SDK sends
            # them back) but are not shown to the model again, as chat templates do.
            items.append({"id": item_id or new_id("rs"), "type": "reasoning",
                          "summary": item.get("summary") or [],
                          **({"content": item["content"]} if item.get("content") else {})})
        else:
            raise InvalidInput(f"Invalid value for '{where}.type': {kind!r} is not an input item type "
                               "llmhost supports (message, function_call, function_call_output, "
                               "reasoning).", param=f"{where}.type")
    return items


# -- stored items -> chat messages ---------------------------------------------------

def chat_messages(instructions: str | None, items: list[dict], first_new: int) -> list[dict]:
    """Chat messages for the conversation `items` (earlier turns first; the
    request's own input from index `first_new`). A function_call_output must
    answer a function_call earlier in the conversation."""
    messages: list[dict] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    calls: set[str] = set()
    previous = None
    for n, item in enumerate(items):
        kind = item["type"]
        if kind == "message":
            if any(part["type"] == "input_image" for part in item["content"]):
                content = [{"type": "image_url", "image_url": {"url": part["image_url"]}}
                           if part["type"] == "input_image" else
                           {"type": "text", "text": part["text"]} for part in item["content"]]
            else:
                content = "".join(part.get("text", part.get("refusal", "")) for part in item["content"])
            messages.append({"role": item["role"], "content": content})
        elif kind == "function_call":
            calls.add(item["call_id"])
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and previous in ("message",
                                                                                  "function_call"):
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if item["call_id"] not in calls:
                where = f"input[{n - first_new}].call_id" if n >= first_new else "previous_response_id"
                raise InvalidInput(f"No tool call found for function call output with call_id "
                                   f"'{item['call_id']}'. A function_call_output must follow the "
                                   "function_call it answers (in this input or the previous "
                                   "response).", param=where)
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": item["output"]})
        previous = kind
    if not messages:
        raise InvalidInput("'input' has no messages for the model.", param="input")
    return messages


# -- tools, tool_choice, text.format -----------------------------------------------

def chat_tools(tools) -> list[dict]:
    out = []
    for i, tool in enumerate(tools or []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != FUNCTION:
            raise InvalidInput(f"Tool type {kind!r} (tools[{i}]) is not supported by llmhost: "
                               "only 'function' tools, which your code runs; built-in tools "
                               "(web_search, file_search, computer_use, code_interpreter, mcp, "
                               "image_generation, ...) are OpenAI services.",
                          param=f"tools[{i}].type", code="unsupported_parameter")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise InvalidInput(f"Missing required parameter: 'tools[{i}].name'.",
                               param=f"tools[{i}].name")
        function = {"name": tool["name"]}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice):
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == FUNCTION and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    kind = choice.get("type") if isinstance(choice, dict) else type(choice).__name__
    raise InvalidInput(f"'tool_choice' is not supported by llmhost with type {kind!r} (use "
                       "'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}).",
                       param="tool_choice", code="unsupported_parameter")


def chat_response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if not fmt:
        return None
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description")
                  if fmt.get(key) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidInput(f"Invalid value for 'text.format.type': {kind!r} (use text, json_object or "
                       "json_schema).", param="text.format.type")


# Chat parameter -> the Responses parameter it came from, for error messages.
PARAMS = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
          "messages": "input", "response_format": "text.format", "tools": "tools",
          "tool_choice": "tool_choice", "reasoning_effort": "reasoning.effort"}


def chat_args(args: dict, items: list[dict], first_new: int) -> dict:
    """Chat-completions arguments for a Responses request whose conversation
    is `items`."""
    out = {"model": args["model"],
           "messages": chat_messages(args.get("instructions"), items, first_new)}
    for name, chat_name in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                            ("top_p", "top_p"), ("user", "user"), ("metadata", "metadata"),
                            ("parallel_tool_calls", "parallel_tool_calls"),
                            ("cache_salt", "cache_salt")):
        if args.get(name) is not None:
            out[chat_name] = args[name]
    tools = chat_tools(args.get("tools"))
    if tools:
        out["tools"] = tools
    choice = chat_tool_choice(args.get("tool_choice"))
    if choice is not None and (tools or choice != "auto"):
        out["tool_choice"] = choice
    response_format = chat_response_format(args.get("text"))
    if response_format is not None and response_format["type"] != "text":
        out["response_format"] = response_format
    effort = (args.get("reasoning") or {}).get("effort")
    if effort is not None:
        out["reasoning_effort"] = effort
    return out


# -- a chat choice -> output items ----------------------------------------------------

def output_items(text: str, tool_calls: list[dict] | None, reasoning: str | None,
                 status: str) -> list[dict]:
    """Reasoning first, then the message (left out when the model only called
    tools), then one function_call per tool call."""
    items = []
    if reasoning:
        items.append(reasoning_item(reasoning, new_id("rs"), status))
    if text or not tool_calls:
        items.append(message_item("assistant", text, new_id("msg"), status))
    for call in tool_calls or []:
        items.append(function_call_item(call, new_id("fc"), status))
    return items


def reasoning_item(text: str, item_id: str, status: str) -> dict:
    return {"id": item_id, "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def function_call_item(call: dict, item_id: str, status: str) -> dict:
    function = call.get("function") or {}
    return {"id": item_id, "type": "function_call", "call_id": call.get("id") or new_id("call"),
            "name": function.get("name", ""), "arguments": function.get("arguments") or "",
            "status": status}


def output_text(items: list[dict]) -> str:
    return "".join(part["text"] for item in items if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")
