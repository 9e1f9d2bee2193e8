"""What /v1/chat/completions and /v1/completions share: request arguments to
sampling settings (with the checks that need the model), and running a
generation as a JSON body or as an event stream. Not a blueprint: the routes
in chat.py and completions.py call :func:`serve` with their own formatter."""
from __future__ import annotations

import hashlib
import time
import uuid
from contextlib import ExitStack, closing
from dataclasses import dataclass
from functools import partial
from typing import Callable, Protocol

from flask import Response, jsonify, request

from ..http import auth, checks, observability, sse
from ..version import __version__
from ..generation.run import Choice, ChoiceDelta, Run
from ..engine.sampling import vocab_size
from ..engine.sampling import SamplingParams
from ..http.errors import invalid
from ..config import settings
from .access import use_model

# `stream: true` answers 200 as server-sent events: documented beside the JSON body.
# Each event is described as an object, the shape SSE-aware tools parse events into.
STREAM_DOC = {200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "description": "A chunk as JSON; the last event is `[DONE]`."}}}}}}}


class Format(Protocol):
    """The OpenAI shapes of one route."""

    id_prefix: str
    object: str            # of the non-streaming body
    chunk_object: str      # of each streamed chunk

    def opening(self, n_choices: int) -> list[dict]:
        """Stream choices sent before any token (chat: the role)."""

    def stream_choice(self, delta: ChoiceDelta) -> dict: ...

    def body_choice(self, choice: Choice) -> dict: ...


# -- arguments -> sampling settings ----------------------------------------------

def stop_token_ids(entry) -> frozenset[int]:
    """EOS ids from the generation config (what `generate` stops on) and the
    tokenizer."""
    ids: set[int] = set()
    eos = getattr(getattr(entry.model, "generation_config", None), "eos_token_id", None)
    for value in (eos, entry.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def max_tokens(args: dict, entry, prompts: list[list[int]], prompt_param: str) -> int:
    """The completion budget per choice. An explicit max_tokens that does not
    fit the context is the client's error (OpenAI's message, with the numbers);
    the default is lowered to what fits, so short-context models just work."""
    config = settings()
    context = entry.loaded.max_context
    longest = max(len(p) for p in prompts)
    what = "messages" if prompt_param == "messages" else "prompt"
    if config.MAX_PROMPT_TOKENS and longest > config.MAX_PROMPT_TOKENS:
        raise invalid(f"Your {what} resulted in {longest} tokens; this server allows at most "
                      f"{config.MAX_PROMPT_TOKENS} prompt tokens (LLMHOST_MAX_PROMPT_TOKENS).",
                      param=prompt_param, code="context_length_exceeded")
    name = "max_completion_tokens" if args.get("max_completion_tokens") is not None else "max_tokens"
    asked = args.get(name)
    room = context - longest
    if asked is None:
        if room < 1:
            raise invalid(f"This model's maximum context length is {context} tokens. However, "
                          f"your {what} resulted in {longest} tokens, which leaves no room for a "
                          f"completion. Please reduce the length of the {what}.",
                          param=prompt_param, code="context_length_exceeded")
        return min(config.DEFAULT_MAX_TOKENS, room)
    if asked > room:
        raise invalid(f"This model's maximum context length is {context} tokens. However, you "
                      f"requested {longest + asked} tokens ({longest} in the {what}, {asked} in "
                      f"the completion). Please reduce the length of the {what} or completion.",
                      param=name, code="context_length_exceeded")
    return asked


def sampling_params(args: dict, entry, prompts: list[list[int]], prompt_param: str,
                    logprobs: int | None) -> SamplingParams:
    config = settings()

    def pick(name, default):
        value = args.get(name)
        return default if value is None else value

    bias = {int(k): float(v) for k, v in (args.get("logit_bias") or {}).items()}
    vocab = vocab_size(entry)
    for token_id in bias:
        if token_id >= vocab:
            raise invalid(f"Invalid value for 'logit_bias': token id {token_id} is outside this "
                          f"model's vocabulary (0..{vocab - 1}).", param="logit_bias")
    return SamplingParams(
        max_tokens=max_tokens(args, entry, prompts, prompt_param),
        temperature=pick("temperature", config.DEFAULT_TEMPERATURE),
        top_p=pick("top_p", config.DEFAULT_TOP_P),
        top_k=pick("top_k", 0),
        min_p=pick("min_p", 0.0),
        repetition_penalty=pick("repetition_penalty", 1.0),
        presence_penalty=pick("presence_penalty", 0.0),
        frequency_penalty=pick("frequency_penalty", 0.0),
        logit_bias=bias,
        seed=args.get("seed"),
        logprobs=logprobs,
        stop_token_ids=stop_token_ids(entry),
    )


# -- running -----------------------------------------------------------------------

def fingerprint(entry) -> str:
    """Changes when what produces the tokens changes (server version, model
    source, dtype, device), as OpenAI's does for its backend."""
    key = f"{__version__}|{entry.spec.model}|{entry.spec.gguf_file}|{entry.loaded.dtype}|" \
          f"{entry.loaded.device}"
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:10]


def usage(run: Run) -> dict:
    return {"prompt_tokens": run.prompt_tokens, "completion_tokens": run.completion_tokens,
            "total_tokens": run.prompt_tokens + run.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": run.cached_tokens}}


Build = Callable[[object], "tuple[list[list[int]], Format]"]


@dataclass
class Started:
    """A generation under way: what a route renders (chat and completions in
    :func:`serve`, the Responses API in responses.py). `stack` holds the
    model in use; the renderer closes it when the answer is complete."""

    entry: object
    run: Run
    fmt: object
    stack: ExitStack
    fields: dict
    log_content: bool


def start(args: dict, build: Build, prompt_param: str, logprobs: int | None) -> Started:
    """Start one request on `args["model"]`: `build(entry)` gives the prompt ids
    and the formatter. The model stays marked in use (registry.use) until the
    answer is complete, for a stream until it ends or the client leaves."""
    fields = observability.log_fields()
    stack = ExitStack()
    try:
        config = settings()
        checks.check_fits_queue(args, config)
        entry = stack.enter_context(use_model(args["model"], task="generate"))
        fields["model"] = entry.id
        checks.check_prompt_chars(entry, args, prompt_param, config)
        prompts, fmt = build(entry)
        params = sampling_params(args, entry, prompts, prompt_param, logprobs)
        params.constraint = getattr(fmt, "constraint", None)   # generation/tools.py
        run = Run(entry, prompts, params, n=args.get("n") or 1, stop=args.get("stop"),
                  disconnected=partial(sse.client_disconnected, request.environ),
                  parser=getattr(fmt, "parser", None), max_calls=config.MAX_TOOL_CALLS,
                  cache_partition=auth.prefix_partition(args.get("cache_salt"),
                                                        config.PREFIX_CACHE_PER_KEY))
        fields["prompt_tokens"] = run.prompt_tokens
        log_content = observability.content_logging_enabled()
        if log_content:  # LLMHOST_LOG_CONTENT=1 only: prompts are private otherwise
            fields["prompt"] = args.get("messages", args.get("prompt"))
        run.start()
    except BaseException:
        stack.close()
        raise
    return Started(entry, run, fmt, stack, fields, log_content)


def serve(args: dict, build: Build, prompt_param: str, logprobs: int | None) -> Response:
    """Run one request and answer it as a JSON body or an event stream."""
    started = start(args, build, prompt_param, logprobs)
    entry, run, fmt, stack = started.entry, started.run, started.fmt, started.stack
    fields, log_content = started.fields, started.log_content
    head = {"id": f"{fmt.id_prefix}-{uuid.uuid4().hex}", "object": fmt.object,
            "created": int(time.time()), "model": entry.id,
            "system_fingerprint": fingerprint(entry)}
    if not args.get("stream"):
        with stack:
            choices = run.collect()
        fields["completion_tokens"] = run.completion_tokens
        if log_content:
            fields["completion"] = [c.text for c in choices]
        return jsonify({**head, "choices": [fmt.body_choice(c) for c in choices],
                        "usage": usage(run)})
    include_usage = bool((args.get("stream_options") or {}).get("include_usage"))
    return sse.stream(_chunks(run, fmt, {**head, "object": fmt.chunk_object}, include_usage,
                              fields, stack, log_content))


def _chunks(run: Run, fmt: Format, head: dict, include_usage: bool, fields: dict,
            stack: ExitStack, log_content: bool):
    """The stream's chunks. Closing this generator early (client gone) or an
    error closes the deltas, which cancels the generation (Run.deltas), and
    releases the model."""
    texts = [""] * len(run.states)
    with stack, closing(run.deltas()) as deltas:
        try:
            for choice in fmt.opening(len(run.states)):
                yield {**head, "choices": [choice]}
            for delta in deltas:
                if log_content:
                    texts[delta.index] += delta.text
                yield {**head, "choices": [fmt.stream_choice(delta)]}
            if include_usage:
                yield {**head, "choices": [], "usage": usage(run)}
        finally:
            fields["completion_tokens"] = run.completion_tokens
            if log_content:
                fields["completion"] = texts

