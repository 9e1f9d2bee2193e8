"""The one door of the other APIs (Anthropic Messages, Ollama) onto the chat
path (DESIGN rule 17): their routes translate a request into an OpenAI chat
request body (generation/anthropic.py, generation/ollama.py), and
:func:`start_chat` loads it through the chat route's own schema and runs it
with the chat route's prompt builder and serving, as /v1/responses does. Not a
blueprint."""
from __future__ import annotations

from contextlib import closing

from marshmallow import ValidationError

from ..generation import plan
from ..http.errors import from_validation
from ..schemas.chat import ChatCompletionRequestSchema
from . import serving
from .access import use_model


def start_chat(body: dict, count_only: bool = False):
    """Run the chat request `body` (a dict as a client would POST to
    /v1/chat/completions): the started generation (serving.Started), or with
    `count_only` the number of prompt tokens it would run, without generating."""
    try:
        request = ChatCompletionRequestSchema().load(body)
    except ValidationError as exc:
        raise from_validation(exc.messages) from None
    if count_only:
        with use_model(request.model, task="generate") as entry:
            ids, _ = plan.chat_ids(request, entry)
        return len(ids)
    return serving.start(request, plan.build_chat)


def relay(started, opening: list[dict], feed, end):
    """A started run's answer in another API's chunks: `opening` first, then
    `feed(delta)` of each delta, then `end(finish_reason, run)`. Closing this
    generator early (the client left) cancels the run; the model is released
    when it ends either way."""
    run = started.run
    finish, finished = None, False
    with started.stack, closing(run.deltas()) as deltas:
        try:
            yield from opening
            for delta in deltas:
                finish = delta.finish_reason or finish
                yield from feed(delta)
            yield from end(finish, run)
            finished = True
        finally:
            started.fields["completion_tokens"] = run.completion_tokens
            if not finished:      # also before the first delta, when closing deltas would not
                run.cancel("its response was closed before the end (the client went away)")
