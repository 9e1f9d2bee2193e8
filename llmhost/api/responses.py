"""The Responses API: POST /v1/responses (plain and streamed), stored
responses (GET / DELETE /v1/responses/{id}, GET .../input_items) and
POST /v1/responses/input_tokens.

One generation path with chat: a request becomes chat-shaped arguments
(llmhost/generation/conversation.py), validated by the chat route's own schema and run by
serving.start with generation.plan.build_chat, as the chat route does; only
the rendering of the result (output items, events) is this module's."""
from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass

import orjson
from flask import jsonify
from marshmallow import ValidationError
from werkzeug.routing import BaseConverter

from ..config import settings
from ..http import auth, sse
from ..generation import conversation, plan
from ..generation.request import ChatRequest
from ..store import responses as store
from ..engine.errors import EngineError
from ..http.errors import APIError, as_api_error, from_validation
from ..http.extensions import Blueprint
from ..schemas.chat import ChatCompletionRequestSchema
from ..schemas.responses import CreateResponseSchema, DeletedResponseSchema, InputItemsQuerySchema, InputTokensSchema, ResponseInputSchema, ResponseItemListSchema, ResponseSchema
from . import serving
from .access import use_model

blp = Blueprint("responses", __name__, url_prefix="/v1",
                description="OpenAI's Responses API, with stored responses.")


class ResponseId(BaseConverter):
    """A response id is any path segment but "input_tokens", so that path's one
    method (POST) is all its 405 answers allow, as the document says."""

    regex = r"(?!input_tokens$)[^/]+"


blp.record_once(lambda state: state.app.url_map.converters.setdefault("response_id", ResponseId))


# -- request -> chat arguments ---------------------------------------------------------

@dataclass
class Prepared:
    chat: ChatRequest       # the chat request that runs it
    items: list[dict]       # the whole conversation (stored as the input items)
    owner: str | None
    sees_all: bool


def _param(name: str | None) -> str | None:
    """A chat parameter named in an error, as the Responses request calls it."""
    if not name:
        return name
    head = name.split("[")[0].split(".")[0]
    if head == "messages":
        return "input"
    if head in conversation.PARAMS:
        return conversation.PARAMS[head] + name[len(head):]
    return name


def _renamed(err: APIError) -> APIError:
    """An error of the chat layer, naming the Responses parameter."""
    param = _param(err.param)
    if err.param and param != err.param:
        err.message = err.message.replace(f"'{err.param}'", f"'{param}'")
    err.param = param
    return err


def _validated_chat(chat: dict) -> ChatRequest:
    """The chat route's schema checks the translated request (ranges, limits,
    and which tools and formats the chat layer supports)."""
    try:
        return ChatCompletionRequestSchema().load(chat)
    except ValidationError as exc:
        raise _renamed(from_validation(exc.messages)) from None
    except APIError as exc:
        raise _renamed(exc) from None


def _renamed_any(exc: APIError | EngineError) -> APIError:
    """An APIError or engine error of the chat layer, naming the Responses
    parameter."""
    return _renamed(as_api_error(exc))


def prepare(args: dict) -> Prepared:
    owner, sees_all = auth.caller()
    items: list[dict] = []
    if args.get("previous_response_id"):
        found = store.current().conversation(
            args["previous_response_id"], owner, sees_all)
        if found is None:
            raise APIError(404, f"Previous response with id '{args['previous_response_id']}' not "
                                "found (it was never stored, was deleted or has expired).",
                           param="previous_response_id", code="response_not_found")
        items = found[1]
    first_new = len(items)
    items += conversation.input_items(args["input"])
    if args.get("store") is not False:
        _bound_stored(items)
    chat = _validated_chat(conversation.chat_args(args, items, first_new))
    return Prepared(chat, items, owner, sees_all)


def _bound_stored(items: list[dict]) -> None:
    """Each stored response copies its conversation: bound that copy, so a chain
    of turns cannot grow the store without limit (issue 26, item 10)."""
    limit = settings().MAX_STORED_INPUT_BYTES
    size = len(orjson.dumps(items))
    if limit and size > limit:
        raise APIError(400, f"The conversation to store is {size} bytes of input items (earlier "
                            f"turns included), over the limit of {limit} bytes "
                            "(LLMHOST_MAX_STORED_INPUT_BYTES). Start a new conversation, send "
                            "less, or send `store: false` without previous_response_id.",
                       param="input", code="stored_input_too_large")


# -- result -> response object ---------------------------------------------------------

def _tools(tools) -> list[dict]:
    return [{"type": "function", "name": t["name"], "description": t.get("description"),
             "parameters": t.get("parameters"), "strict": t.get("strict")}
            for t in tools or []]


class Renderer:
    """Response objects of one request, as it goes."""

    def __init__(self, args: dict, started: serving.Started) -> None:
        self.args = args
        self.started = started
        self.id = conversation.new_id("resp")
        self.created_at = int(time.time())

    def usage(self, reasoning: str) -> dict:
        run = self.started.run
        reasoning_tokens = 0
        if reasoning:
            reasoning_tokens = len(self.started.entry.tokenizer(
                reasoning, add_special_tokens=False)["input_ids"])
        return {"input_tokens": run.prompt_tokens,
                "input_tokens_details": {"cached_tokens": run.cached_tokens,
                                         "cache_write_tokens": 0},
                "output_tokens": run.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "total_tokens": run.prompt_tokens + run.completion_tokens}

    def body(self, status: str, output: list[dict], usage: dict | None = None,
             error: dict | None = None) -> dict:
        args, params = self.args, self.started.run.params
        body = {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": args.get("instructions"),
            "max_output_tokens": args.get("max_output_tokens"),
            "model": args["model"],      # as the client named it (an alias too)
            "output": output,
            "output_text": conversation.output_text(output),
            "parallel_tool_calls": args.get("parallel_tool_calls") is not False,
            "previous_response_id": args.get("previous_response_id"),
            "reasoning": args.get("reasoning"),
            "store": args.get("store") is not False,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "text": args.get("text") or {"format": {"type": "text"}},
            "tool_choice": args.get("tool_choice") or "auto",
            "tools": _tools(args.get("tools")),
            "truncation": "disabled",
            "metadata": args.get("metadata") or {},
        }
        if usage is not None:
            body["usage"] = usage
        if args.get("user"):
            body["user"] = args["user"]
        return body


def _final_status(finish_reason: str | None, cancelled: bool) -> str:
    if cancelled:
        return "cancelled"
    return "incomplete" if finish_reason == "length" else "completed"


# -- routes ------------------------------------------------------------------------

@blp.route("/responses", methods=["POST"])
@blp.arguments(CreateResponseSchema)
@blp.response(200, ResponseSchema, description="A response object; with `stream: true`, a "
              "text/event-stream of response events (`event: <type>` and `data: <json>`, "
              "each with a `sequence_number`), ending with response.completed, "
              "response.incomplete or response.failed.")
# `stream: true` answers 200 as named server-sent events (documented for OpenAPI
# clients and the schemathesis test beside the JSON body).
@blp.doc(responses={200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["event", "data"], "properties": {
        "event": {"type": "string", "description": "The event's `type`."},
        "data": {"type": "string", "description": "The event as JSON; the last one is "
                                                  "`response.completed` (or failed/incomplete)."}}}}}}})
@blp.errors(400, 404, 429, 500, 503)
def create_response(args):
    """Create a model response

    The input (and, with previous_response_id, the stored conversation before
    it) is run as the same chat request /v1/chat/completions would run; the
    answer is OpenAI's response object, stored unless `store: false`.
    """
    prepared = prepare(args)
    try:
        started = serving.start(prepared.chat, plan.build_chat)
    except (APIError, EngineError) as exc:
        raise _renamed_any(exc) from None
    renderer = Renderer(args, started)
    saved = None
    if args.get("store") is not False:
        try:
            saved = store.current()
            saved.create(renderer.body("in_progress", []), prepared.owner, prepared.items)
        except BaseException as exc:
            started.run.cancel(f"its response could not be stored ({type(exc).__name__})")
            started.stack.close()
            raise
    if args.get("stream"):
        return sse.stream(_events(renderer, saved), named=True, done=False)
    return jsonify(_collect(renderer, saved))


def _collect(renderer: Renderer, saved) -> dict:
    started = renderer.started
    try:
        with started.stack:
            choice = started.run.collect()[0]
    except (APIError, EngineError) as exc:
        if saved is not None:
            saved.finish(renderer.body("failed", [], error={"code": "server_error",
                                                            "message": as_api_error(exc).message}))
        raise
    finally:
        started.fields["completion_tokens"] = started.run.completion_tokens
    status = _final_status(choice.finish_reason, started.run.cancelled)
    reasoning = getattr(choice, "reasoning", None) or ""
    output = conversation.output_items(choice.text, getattr(choice, "tool_calls", None),
                                       reasoning, "incomplete" if status != "completed"
                                       else "completed")
    body = renderer.body(status, output, renderer.usage(reasoning))
    if started.log_content:
        started.fields["completion"] = [body["output_text"]]
    if saved is not None:
        saved.finish(body)
    return body


class _Open:
    """An output item being streamed."""

    def __init__(self, kind: str, item: dict, index: int) -> None:
        self.kind = kind
        self.item = item
        self.index = index
        self.text = ""


def _events(renderer: Renderer, saved):
    """The official event sequence. Closing this generator early (the client
    went away) cancels the generation through Run.deltas and marks the
    stored response cancelled."""
    started = renderer.started
    run = started.run
    seq = 0
    output: list[dict] = []
    current: _Open | None = None
    calls: dict[int, _Open] = {}
    finish = None
    reasoning_text = ""
    finished = False

    def ev(kind: str, **fields) -> dict:
        nonlocal seq
        event = {"type": kind, **fields, "sequence_number": seq}
        seq += 1
        return event

    def open_item(kind: str, item: dict) -> list[dict]:
        nonlocal current
        events = close(None)
        output.append(item)
        current = _Open(kind, item, len(output) - 1)
        events.append(ev("response.output_item.added", output_index=current.index,
                         item={**item, "content": []} if "content" in item else dict(item)))
        if kind == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        elif kind == "reasoning":
            part = {"type": "reasoning_text", "text": ""}
        else:
            return events
        events.append(ev("response.content_part.added", item_id=item["id"],
                         output_index=current.index, content_index=0, part=part))
        return events

    def close(status: str | None) -> list[dict]:
        """Events that end the current item (completed, or `status`)."""
        nonlocal current
        if current is None:
            return []
        item, index, text = current.item, current.index, current.text
        item["status"] = status or "completed"
        events = []
        if current.kind == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            item["content"] = [part]
            events.append(ev("response.output_text.done", item_id=item["id"], output_index=index,
                             content_index=0, text=text, logprobs=[]))
            events.append(ev("response.content_part.done", item_id=item["id"],
                             output_index=index, content_index=0, part=part))
        elif current.kind == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            item["content"] = [part]
            events.append(ev("response.reasoning_text.done", item_id=item["id"],
                             output_index=index, content_index=0, text=text))
            events.append(ev("response.content_part.done", item_id=item["id"],
                             output_index=index, content_index=0, part=part))
        else:
            item["arguments"] = text
            events.append(ev("response.function_call_arguments.done", item_id=item["id"],
                             output_index=index, name=item["name"], arguments=text))
        events.append(ev("response.output_item.done", output_index=index, item=dict(item)))
        current = None
        return events

    with started.stack, closing(run.deltas()) as deltas:
        try:
            opening = renderer.body("in_progress", [])
            yield ev("response.created", response=opening)
            yield ev("response.in_progress", response=opening)
            for delta in deltas:
                piece = getattr(delta, "reasoning", None)
                if piece:
                    reasoning_text += piece
                    if current is None or current.kind != "reasoning":
                        yield from open_item("reasoning", conversation.reasoning_item(
                            "", conversation.new_id("rs"), "in_progress"))
                    current.text += piece
                    yield ev("response.reasoning_text.delta", item_id=current.item["id"],
                             output_index=current.index, content_index=0, delta=piece)
                if delta.text:
                    if current is None or current.kind != "message":
                        yield from open_item("message", conversation.message_item(
                            "assistant", "", conversation.new_id("msg"), "in_progress"))
                    current.text += delta.text
                    yield ev("response.output_text.delta", item_id=current.item["id"],
                             output_index=current.index, content_index=0, delta=delta.text,
                             logprobs=[])
                for call in getattr(delta, "tool_calls", None) or []:
                    number = call.get("index", 0)
                    function = call.get("function") or {}
                    if number not in calls:
                        yield from open_item("function_call", conversation.function_call_item(
                            {"id": call.get("id"), "function": {"name": function.get("name")}},
                            conversation.new_id("fc"), "in_progress"))
                        calls[number] = current
                    target = calls[number]
                    if function.get("arguments"):
                        target.text += function["arguments"]
                        if target is current:
                            yield ev("response.function_call_arguments.delta",
                                     item_id=target.item["id"], output_index=target.index,
                                     delta=function["arguments"])
                finish = delta.finish_reason or finish
            status = _final_status(finish, run.cancelled)
            item_status = "completed" if status == "completed" else "incomplete"
            yield from close(item_status)
            if not output:          # nothing generated: still one (empty) message
                yield from open_item("message", conversation.message_item(
                    "assistant", "", conversation.new_id("msg"), "in_progress"))
                yield from close(item_status)
            body = renderer.body(status, output, renderer.usage(reasoning_text))
            if started.log_content:
                started.fields["completion"] = [body["output_text"]]
            if saved is not None:
                saved.finish(body)
            finished = True
            yield ev(f"response.{status}" if status in ("completed", "incomplete")
                     else "response.failed", response=body)
        except (APIError, EngineError) as exc:
            finished = True
            err = as_api_error(exc)
            body = renderer.body("failed", output, error={"code": "server_error",
                                                          "message": err.message})
            if saved is not None and not isinstance(exc, store.StoreError):
                try:
                    saved.finish(body)
                except store.StoreError:
                    pass
            yield ev("response.failed", response=body)
        finally:
            started.fields["completion_tokens"] = run.completion_tokens
            if not finished:    # the client went away mid-stream
                # Also before the first delta, when closing the unstarted deltas
                # would not cancel the run.
                run.cancel("its response stream was closed before the end "
                           "(the client went away)")
            if not finished and saved is not None:
                try:
                    saved.finish(renderer.body("cancelled", output))
                except store.StoreError:
                    pass


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"No response with id '{response_id}' found (it was never stored, "
                         "was deleted, or has expired).", param="response_id",
                    code="response_not_found")


@blp.route("/responses/<response_id:response_id>", methods=["GET"])
@blp.response(200, ResponseSchema)
@blp.errors(404, 500)
def retrieve_response(response_id):
    """Retrieve a stored response"""
    owner, sees_all = auth.caller()
    body = store.current().get(response_id, owner, sees_all)
    if body is None:
        raise _not_found(response_id)
    return jsonify(body)


@blp.route("/responses/<response_id:response_id>", methods=["DELETE"])
@blp.response(200, DeletedResponseSchema)
@blp.errors(404, 500)
def delete_response(response_id):
    """Delete a stored response

    Its input items go with it; responses that continued it keep their own
    copy of the conversation.
    """
    owner, sees_all = auth.caller()
    if not store.current().delete(response_id, owner, sees_all):
        raise _not_found(response_id)
    return jsonify({"id": response_id, "object": "response", "deleted": True})


@blp.route("/responses/<response_id:response_id>/input_items", methods=["GET"])
@blp.arguments(InputItemsQuerySchema, location="query")
@blp.response(200, ResponseItemListSchema)
@blp.errors(400, 404, 500)
def list_input_items(query, response_id):
    """List a stored response's input items

    The whole conversation the model saw (earlier turns included), newest
    first by default; page with `after` (an item id) and `limit`.
    """
    owner, sees_all = auth.caller()
    page = store.current().input_items(
        response_id, owner, sees_all, query.get("after"), query["limit"], query["order"])
    if page is None:
        raise _not_found(response_id)
    data, has_more = page
    return jsonify({"object": "list", "data": data,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None, "has_more": has_more})


@blp.route("/responses/input_tokens", methods=["POST"])
@blp.arguments(ResponseInputSchema)
@blp.response(200, InputTokensSchema)
@blp.errors(400, 404, 500, 503)
def count_input_tokens(args):
    """Count a response's input tokens

    The prompt the same POST /v1/responses would run (templating, tools and
    previous_response_id included), counted without generating.
    """
    prepared = prepare(args)
    with use_model(prepared.chat.model, task="generate") as entry:
        try:
            ids, _ = plan.chat_ids(prepared.chat, entry)
        except (APIError, EngineError) as exc:
            raise _renamed_any(exc) from None
    return jsonify({"object": "response.input_tokens", "input_tokens": len(ids)})
