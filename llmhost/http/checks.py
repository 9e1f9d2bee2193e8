"""Cheap checks on what a client sends, done before any expensive work, so
that hostile or broken input is a 4xx and never a 500, a stuck thread or a
memory spike (issue 9). Each check is bounded by the size of the input."""
from __future__ import annotations

import re

from .errors import APIError, invalid

# JSON that nests deeper than this is refused: no OpenAI request needs it, and
# deep nesting makes recursive code (json, marshmallow, jsonify) raise
# RecursionError. Tool schemas of real agents stay far below it.
MAX_JSON_DEPTH = 64
# A lone UTF-16 surrogate can only come from a \uD800..\uDFFF escape.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]", re.ASCII)


_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}:]', re.DOTALL)


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def text_depth(text: str) -> int:
    """How deep the JSON in a string nests (brackets outside JSON strings), without
    parsing it: `arguments` strings are parsed later by recursive code."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRINGS.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def too_deep(raw: bytes) -> APIError:
    """The 400 for a body too deep for the JSON parser, naming the top-level
    field that holds the nesting (a scan of the raw tokens, no recursion)."""
    depth, key, last_string = 0, None, None
    for match in _JSON_TOKENS.finditer(raw):
        token = match.group()
        if token in (b"{", b"["):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                break
        elif token in (b"}", b"]"):
            depth -= 1
        elif token == b":":
            if depth == 1 and last_string is not None:
                key = last_string[1:-1].decode("utf-8", "replace")
        else:
            last_string = token
    where = f" at '{key}'" if key else ""
    return invalid(f"The JSON body nests deeper than {MAX_JSON_DEPTH} levels{where}; no request "
                   "needs that.", param=key, code="json_too_deep")


def _path(parts: list) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def check_json(raw: bytes, data) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings holding lone
    surrogates (they cannot be encoded as UTF-8: tokenizers and logs fail on
    them), naming where. Iterative, so depth cannot overflow the stack."""
    surrogates = bool(_SURROGATE_ESCAPE.search(raw))
    stack = [(data, [], 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, list):
            items = enumerate(value)
        else:
            if surrogates and isinstance(value, str):
                _check_text(value, path)
            continue
        if depth >= MAX_JSON_DEPTH:
            raise invalid(f"The JSON body nests deeper than {MAX_JSON_DEPTH} levels at "
                          f"'{_path(path) or '(root)'}'; no request needs that.",
                          param=_path(path[:1]) or None, code="json_too_deep")
        for key, item in items:
            if surrogates and isinstance(key, str):
                _check_text(key, path + [key])
            if isinstance(item, (dict, list)) or (surrogates and isinstance(item, str)):
                stack.append((item, path + [key], depth + 1))


def _check_text(text: str, path: list) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = _path(path)
        raise invalid(f"Invalid value for '{where}': the string holds a lone UTF-16 surrogate "
                      "(an unpaired \\ud800-\\udfff escape), which is not text. Send valid "
                      "Unicode.", param=where or None, code="invalid_unicode")


def check_fits_queue(prompts: int, config) -> None:
    """A request whose prompts can never all wait for the model at once would
    get a 429 forever: say so with a 400 instead."""
    limit = config.MAX_QUEUE
    if prompts > limit:
        raise invalid(f"'prompt' holds {prompts} prompts; this server queues at most {limit} "
                      f"prompts per model at once (LLMHOST_MAX_QUEUE), with {config.MAX_BATCH} "
                      "generated together (LLMHOST_MAX_BATCH). Send them in smaller requests.",
                      param="prompt", code="too_many_prompts")


def longest_token_chars(tokenizer) -> int:
    """The most characters one token of this tokenizer spells (its vocabulary
    strings: byte-level BPE writes each byte as one character, so a token's
    text is never longer). Computed once per tokenizer, a token at a time from a
    fast tokenizer's backend: its get_vocab() dict of SmolLM2's 49,152 strings
    left the worker 8 MiB larger for good (and took 28 ms, against 18)."""
    cached = getattr(tokenizer, "_llmhost_longest_token", None)
    if cached is None:
        try:
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is not None:
                cached = max((len(backend.id_to_token(i) or "") for i in range(backend.get_vocab_size())),
                             default=64) or 64
            else:
                cached = max((len(t) for t in tokenizer.get_vocab()), default=64) or 64
        except Exception:   # a tokenizer without a vocabulary listing
            cached = 64
        try:
            tokenizer._llmhost_longest_token = cached
        except AttributeError:
            pass
    return cached


def _text_chars(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value if isinstance(v, (str, list, dict)))
    if isinstance(value, dict):
        return _text_chars(value.get("content")) + _text_chars(value.get("text"))
    return 0


def check_prompt_chars(entry, value, prompt_param: str, config,
                       template_kwargs: dict | None = None) -> None:
    """Refuse text that cannot fit the model's context before tokenizing it:
    a prompt of N characters is at least N / (longest token) tokens, so a
    6 MB prompt is a cheap 400 instead of a gigabyte of tokenizer memory."""
    budget = entry.loaded.max_context
    if config.MAX_PROMPT_TOKENS:
        budget = min(budget, config.MAX_PROMPT_TOKENS)
    longest = longest_token_chars(entry.tokenizer)
    items = value if prompt_param == "prompt" and isinstance(value, list) else [value]
    # chat_template_kwargs strings (a `bos_token`) are rendered into the prompt too
    kwargs = list((template_kwargs or {}).values())
    for item, param in [(item, prompt_param) for item in items] + [(kwargs, "chat_template_kwargs")]:
        chars = _text_chars(item)
        if chars > budget * longest:
            what = "messages" if param == "messages" else param
            raise invalid(f"Your {what} holds {chars} characters: at least "
                          f"{-(-chars // longest)} tokens, more than the {budget} tokens this "
                          f"model accepts. Please reduce the length of the {what}.",
                          param=param, code="context_length_exceeded")


def embedding_inputs(entry, inputs: list, truncate: bool) -> list:
    """The same character bound for embedding texts: over it, an input is a 400
    before tokenizing (or, with `truncate`, cut to the characters that can
    still matter, so a 6 MB input never reaches the tokenizer whole)."""
    if not inputs or not isinstance(inputs[0], str):
        return inputs
    max_len = getattr(entry.engine, "max_len", None)
    if not max_len:
        return inputs
    bound = max_len * longest_token_chars(entry.tokenizer)
    left = getattr(entry.tokenizer, "truncation_side", "right") == "left"
    out = []
    for i, text in enumerate(inputs):
        if len(text) > bound:
            if not truncate:
                raise invalid(f"'input[{i}]' holds {len(text)} characters: more than the "
                              f"{max_len} tokens '{entry.id}' reads. Shorten it, or send "
                              "\"truncate\": true to cut inputs at the model's maximum length.",
                              param="input", code="context_length_exceeded")
            text = text[-bound:] if left else text[:bound]
        out.append(text)
    return out
