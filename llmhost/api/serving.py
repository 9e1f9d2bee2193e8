"""What /v1/chat/completions and /v1/completions share: running a request's
generation Plan (generation/plan.py) as a JSON body or as an event stream.
Not a blueprint: the routes call :func:`serve` with their typed request, the
plan builder (generation.plan.build_chat / build_completion) and their
formatter; /v1/responses calls :func:`start` and renders the run itself."""
from __future__ import annotations

import hashlib
import time
import uuid
from contextlib import ExitStack, closing
from dataclasses import dataclass
from functools import partial
from typing import Callable, Protocol

from flask import Response, jsonify, request as http_request

from ..config import settings
from ..generation.plan import Plan
from ..generation.request import TextRequest
from ..generation.run import Choice, ChoiceDelta, Run
from ..http import auth, checks, metering, observability, sse
from ..version import __version__
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


Build = Callable[[TextRequest, object], Plan]          # (request, model entry) -> Plan
MakeFormat = Callable[[object, Plan], "Format"]       # (model entry, plan) -> formatter


@dataclass
class Started:
    """A generation under way: what a route renders (chat and completions in
    :func:`serve`, the Responses API in responses.py). `stack` holds the
    model in use; the renderer closes it when the answer is complete."""

    entry: object
    run: Run
    plan: Plan
    stack: ExitStack
    fields: dict
    log_content: bool


def start(request: TextRequest, build: Build) -> Started:
    """Start one request on `request.model`: `build(request, entry)` gives its
    Plan. The model stays marked in use (registry.use) until the answer is
    complete, for a stream until it ends or the client leaves."""
    fields = observability.log_fields()
    stack = ExitStack()
    try:
        config = settings()
        checks.check_fits_queue(request.prompt_count(), config)
        entry = stack.enter_context(use_model(request.model, task="generate"))
        fields["model"] = entry.id
        checks.check_prompt_chars(entry, request.prompt_input(), request.prompt_param, config,
                                  request.template_kwargs())
        plan = build(request, entry)
        run = Run(entry, plan.prompts, plan.params, n=plan.n, stop=plan.stop,
                  disconnected=partial(sse.client_disconnected, http_request.environ),
                  parser=plan.parser, max_calls=config.MAX_TOOL_CALLS,
                  cache_partition=auth.prefix_partition(request.cache_salt,
                                                        config.PREFIX_CACHE_PER_KEY))
        fields["prompt_tokens"] = run.prompt_tokens
        # the worst case, settled to the real count at the end (http/metering.py)
        metering.admit_tokens(run.prompt_tokens + plan.params.max_tokens * len(run.states))
        metering.track(run)
        log_content = observability.content_logging_enabled()
        if log_content:  # LLMHOST_LOG_CONTENT=1 only: prompts are private otherwise
            fields["prompt"] = request.prompt_input()
        run.start()
    except BaseException:
        stack.close()
        raise
    return Started(entry, run, plan, stack, fields, log_content)


def serve(request: TextRequest, build: Build, make_format: MakeFormat) -> Response:
    """Run one request and answer it as a JSON body or an event stream:
    `build` makes its Plan, `make_format` the route's formatter."""
    started = start(request, build)
    entry, run, stack = started.entry, started.run, started.stack
    fmt = make_format(entry, started.plan)
    fields, log_content = started.fields, started.log_content
    head = {"id": f"{fmt.id_prefix}-{uuid.uuid4().hex}", "object": fmt.object,
            "created": int(time.time()), "model": request.model,   # as sent (an alias too)
            "system_fingerprint": fingerprint(entry)}
    if not request.stream:
        with stack:
            choices = run.collect()
        fields["completion_tokens"] = run.completion_tokens
        if log_content:
            fields["completion"] = [c.text for c in choices]
        return jsonify({**head, "choices": [fmt.body_choice(c) for c in choices],
                        "usage": usage(run)})
    return sse.stream(_chunks(run, fmt, {**head, "object": fmt.chunk_object},
                              request.include_usage, fields, stack, log_content))

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

