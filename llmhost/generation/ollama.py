"""Ollama's API, both ways, as a translation onto the chat path (DESIGN rule 17):

* :func:`chat_body` turns /api/chat and /api/generate requests (``messages`` or
  ``prompt`` + ``system``, ``format`` as ``"json"`` or a JSON schema,
  ``options`` such as ``temperature``, ``top_p``, ``top_k``, ``num_predict``,
  ``stop``, ``seed``, ``tools``, ``think``) into an OpenAI chat request body;
* :class:`ReplyBuilder` turns the run's deltas into Ollama's NDJSON chunks
  (``done: false`` pieces, then one ``done: true`` line with ``done_reason`` and
  the timing fields, in nanoseconds) and, from the same chunks, the
  non-streamed reply;
* :func:`model_card` describes a loaded model as /api/tags, /api/show and
  /api/ps list it.
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone

from ..engine.errors import InvalidInput, unsupported

# Ollama option -> OpenAI chat parameter (the others, such as num_ctx or
# num_thread, tune Ollama's own runner and are ignored).
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "seed": "seed", "stop": "stop", "repeat_penalty": "repetition_penalty",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
ROLES = ("system", "user", "assistant", "tool")


def timestamp(seconds: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama writes `created_at`."""
    moment = datetime.fromtimestamp(seconds if seconds is not None else time.time(), timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


def _no_images(message: dict, where: str) -> None:
    if message.get("images"):
        raise unsupported(f"{where}.images", ": this server's models take text only")


def _messages(messages: list, where: str = "messages") -> list[dict]:
    """Ollama's messages as OpenAI's: calls get ids (Ollama's have none) and
    each tool result answers the latest call of its `tool_name`."""
    out: list[dict] = []
    calls: list[tuple[str, str]] = []     # (id, name) of calls not yet answered
    for i, message in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidInput(f"Invalid value for '{at}.role': must be one of "
                               f"{', '.join(ROLES)}.", param=f"{at}.role")
        _no_images(message, at)
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise InvalidInput(f"Invalid value for '{at}.content': must be a string.",
                               param=f"{at}.content")
        role = message["role"]
        if message.get("tool_calls") is not None and not isinstance(message["tool_calls"], list):
            raise InvalidInput(f"Invalid value for '{at}.tool_calls': must be an array.",
                               param=f"{at}.tool_calls")
        if role == "assistant" and message.get("tool_calls"):
            made = []
            for j, call in enumerate(message["tool_calls"]):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise InvalidInput(f"Invalid value for '{at}.tool_calls[{j}].function': needs a "
                                       "'name'.", param=f"{at}.tool_calls[{j}].function")
                call_id = f"call_{i}_{j}"
                calls.append((call_id, function["name"]))
                arguments = function.get("arguments") or {}
                made.append({"id": call_id, "type": "function", "function": {
                    "name": function["name"],
                    "arguments": arguments if isinstance(arguments, str)
                    else json.dumps(arguments, ensure_ascii=False)}})
            out.append({"role": "assistant", "content": content or None, "tool_calls": made})
        elif role == "tool":
            name = message.get("tool_name") or message.get("name")
            match = next((c for c in reversed(calls) if c[1] == name), None) \
                or (calls[-1] if calls else None)
            if match is not None:
                calls.remove(match)
            out.append({"role": "tool", "content": content or "",
                        "tool_call_id": match[0] if match else f"call_{i}"})
        else:
            out.append({"role": role, "content": content or ""})
    return out


def _format(value) -> dict | None:
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise InvalidInput("Invalid value for 'format': must be \"json\" or a JSON schema object.",
                       param="format")


def _options(options) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidInput("Invalid value for 'options': must be an object.", param="options")
    out = {OPTIONS[k]: v for k, v in options.items() if k in OPTIONS and v is not None}
    predict = options.get("num_predict")
    if predict is not None:
        if not isinstance(predict, int) or isinstance(predict, bool):
            raise InvalidInput("Invalid value for 'options.num_predict': must be an integer.",
                               param="options.num_predict")
        if predict > 0:                    # -1 (no limit) and -2 (fill): the default
            out["max_tokens"] = predict
    return out


def chat_body(args: dict) -> dict:
    """The OpenAI chat request body of an /api/chat request (or of an
    /api/generate one, whose `prompt` and `system` become the messages)."""
    if "prompt" in args:
        for name in ("suffix", "template", "context"):
            if args.get(name):
                raise unsupported(name)
        if args.get("raw"):
            raise unsupported("raw", ": the prompt is always rendered with the model's chat "
                                "template (use /v1/completions for raw text)")
        _no_images(args, "")
        messages = ([{"role": "system", "content": args["system"]}] if args.get("system") else []) \
            + [{"role": "user", "content": args["prompt"]}]
    else:
        messages = _messages(args["messages"])
    body: dict = {"model": args["model"], "messages": messages, **_options(args.get("options"))}
    response_format = _format(args.get("format"))
    if response_format is not None:
        body["response_format"] = response_format
    if args.get("tools"):
        body["tools"] = args["tools"]
        if args.get("tool_choice") is not None:     # an llmhost extra
            body["tool_choice"] = args["tool_choice"]
    if args.get("think") is False:
        body["reasoning_effort"] = "none"   # templates with an enable_thinking switch
    return body


# -- the run -> chunks ------------------------------------------------------------------

class ReplyBuilder:
    """Ollama's chunks of one answer (`generate`: /api/generate's shape, with
    `response` and `thinking` at the top level; else /api/chat's `message`)."""

    def __init__(self, model: str, generate: bool, started_at: float) -> None:
        self.model = model
        self.generate = generate
        self.started_at = started_at            # time.perf_counter() when the request came
        self.first_at: float | None = None
        self.text = ""
        self.thinking = ""
        self.calls: dict[int, dict] = {}

    def _chunk(self, content: str, thinking: str = "", calls: list[dict] | None = None) -> dict:
        if self.generate:
            body = {"response": content}
            if thinking:
                body["thinking"] = thinking
        else:
            message = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            body = {"message": message}
        return {"model": self.model, "created_at": timestamp(), **body, "done": False}

    def feed(self, delta) -> list[dict]:
        """The chunks of one ChoiceDelta (generation/run.py): text and thought
        as they come; tool calls are gathered and sent whole at the end, as
        Ollama sends them."""
        if self.first_at is None:
            self.first_at = time.perf_counter()
        for call in delta.tool_calls or []:
            slot = self.calls.setdefault(call.get("index", 0), {"name": "", "arguments": ""})
            function = call.get("function") or {}
            slot["name"] += function.get("name") or ""
            slot["arguments"] += function.get("arguments") or ""
        self.text += delta.text
        self.thinking += delta.reasoning
        if not delta.text and not delta.reasoning:
            return []
        return [self._chunk(delta.text, delta.reasoning)]

    def _tool_calls(self) -> list[dict]:
        out = []
        for number in sorted(self.calls):
            slot = self.calls[number]
            try:
                arguments = json.loads(slot["arguments"]) if slot["arguments"].strip() else {}
            except ValueError:
                arguments = {}
            out.append({"function": {"name": slot["name"], "arguments": arguments}})
        return out

    def end(self, finish_reason: str | None, prompt_tokens: int, completion_tokens: int) -> list[dict]:
        """The last chunks: the tool calls (if any), then `done: true` with the
        timings."""
        now = time.perf_counter()
        first = self.first_at or now
        chunks = []
        calls = self._tool_calls()
        if calls and not self.generate:
            chunks.append(self._chunk("", calls=calls))
        final = self._chunk("")
        final.update({
            "done": True, "done_reason": "length" if finish_reason == "length" else "stop",
            "total_duration": int((now - self.started_at) * 1e9), "load_duration": 0,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": int((first - self.started_at) * 1e9),
            "eval_count": completion_tokens, "eval_duration": int((now - first) * 1e9)})
        return chunks + [final]

    def reply(self, chunks: list[dict]) -> dict:
        """The non-streamed reply: the last chunk, holding the whole answer."""
        final = dict(chunks[-1])
        if self.generate:
            final["response"] = self.text
            if self.thinking:
                final["thinking"] = self.thinking
        else:
            message = {"role": "assistant", "content": self.text}
            if self.thinking:
                message["thinking"] = self.thinking
            calls = self._tool_calls()
            if calls:
                message["tool_calls"] = calls
            final["message"] = message
        return final


# -- models as Ollama lists them ------------------------------------------------------

def _parameter_size(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}".replace(".0", "")
    return str(count)


def digest(name: str) -> str:
    """A stable stand-in for Ollama's blob digest (the served id's SHA-256)."""
    return hashlib.sha256(name.encode()).hexdigest()


def model_card(entry) -> dict:
    """A loaded model as /api/tags and /api/ps list it."""
    config = getattr(entry.model, "config", None)
    family = getattr(config, "model_type", None) or ""
    ld = entry.loaded
    return {"name": entry.id, "model": entry.id, "modified_at": timestamp(entry.created),
            "size": ld.memory_bytes, "digest": digest(entry.id),
            "details": {"parent_model": "", "format": "gguf" if ld.gguf_file else "safetensors",
                        "family": family, "families": [family] if family else None,
                        "parameter_size": _parameter_size(ld.parameters),
                        "quantization_level": ld.quantization or ld.dtype}}
