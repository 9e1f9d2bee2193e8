"""Anthropic's Messages API: POST /v1/messages (plain and streamed) and
POST /v1/messages/count_tokens.

A translation onto the chat path (generation/anthropic.py, api/chatpath.py):
tools, grammars, reasoning and batching are /v1/chat/completions' own. Errors
on these routes come in Anthropic's envelope (http/errors.py picks it by this
blueprint); the key may come as `x-api-key` (http/auth.py); any
`anthropic-version` and `anthropic-beta` header is accepted."""
from __future__ import annotations

from flask import jsonify

from ..generation import anthropic
from ..http import sse
from ..http.extensions import Blueprint
from ..schemas.anthropic import CountTokensSchema, AnthropicMessageSchema, MessagesRequestSchema, TokenCountSchema
from .chatpath import relay, start_chat

blp = Blueprint("anthropic", __name__, url_prefix="/v1",
                description="Anthropic's Messages API, on the same models and chat path.")


@blp.route("/messages", methods=["POST"])
@blp.arguments(MessagesRequestSchema)
@blp.response(200, AnthropicMessageSchema, description="A message; with `stream: true`, Anthropic's "
              "server-sent events (`event: <type>`, `data: <json>`).")
@blp.errors(400, 404, 429, 503)
def create_message(args):
    """Create a message (Anthropic Messages API)

    Run as the chat request it translates to; answered in Anthropic's shapes,
    named after the model the client asked for.
    """
    started = start_chat(anthropic.chat_body(args))
    builder = anthropic.MessageBuilder(args["model"], started.run.prompt_tokens,
                                       started.run.cached_tokens)
    events = relay(started, builder.start(), builder.feed, lambda finish, run: builder.end(
        finish, run.states[0].text.stop.matched, run.completion_tokens))
    if args.get("stream"):
        return sse.stream(events, named=True, done=False)
    for _ in events:
        pass
    return jsonify(builder.message)


@blp.route("/messages/count_tokens", methods=["POST"])
@blp.arguments(CountTokensSchema)
@blp.response(200, TokenCountSchema)
@blp.errors(400, 404)
def count_tokens(args):
    """Count a message's input tokens (Anthropic Messages API)

    The prompt POST /v1/messages would run (system, tools and templating
    included), counted without generating.
    """
    return jsonify({"input_tokens": start_chat(anthropic.chat_body(args), count_only=True)})
