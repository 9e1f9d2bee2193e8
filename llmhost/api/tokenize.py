"""POST /tokenize and /detokenize (also under /v1), in vLLM's shapes, so
clients written for vLLM count tokens here too. Text is tokenized as
/v1/completions does and messages are rendered as /v1/chat/completions does,
so `count` equals the `usage.prompt_tokens` those routes report."""
from __future__ import annotations

from flask import jsonify

from ..generation import plan
from ..generation.prompt import completion_prompts
from ..generation.request import ChatRequest
from ..engine.sampling import vocab_size
from ..generation.text import token_string
from ..config import settings
from ..http import checks
from ..http.errors import invalid
from ..http.extensions import Blueprint
from ..schemas.responses import DetokenizeRequestSchema, DetokenizeResponseSchema, TokenizeRequestSchema, TokenizeResponseSchema
from .access import use_model

blp = Blueprint("tokenize", __name__, description="Token counting (vLLM's /tokenize and "
                                                  "/detokenize).")


@blp.route("/tokenize", methods=["POST"], endpoint="tokenize")
@blp.route("/v1/tokenize", methods=["POST"], endpoint="tokenize_v1")
@blp.arguments(TokenizeRequestSchema)
@blp.response(200, TokenizeResponseSchema)
@blp.errors(400, 404, 503)
def tokenize(args):
    """Tokenize a prompt or a conversation

    `prompt` is tokenized as /v1/completions does; `messages` are rendered with
    the chat template as /v1/chat/completions does (generation prompt
    included). `count` is the `usage.prompt_tokens` of that request.
    """
    with use_model(args["model"], task="generate") as entry:
        # what cannot fit the context is a 400 before tokenizing (as completions)
        param = "messages" if "messages" in args else "prompt"
        checks.check_prompt_chars(entry, args[param], param, settings(),
                                  args.get("chat_template_kwargs"))
        if "messages" in args:
            ids, _ = plan.chat_ids(ChatRequest(
                model=args["model"], messages=args["messages"],
                reasoning_effort=args.get("reasoning_effort"),
                chat_template_kwargs=args.get("chat_template_kwargs")), entry)
        elif args["add_special_tokens"]:
            ids = completion_prompts(entry, args["prompt"])[0][0]
        else:
            ids = [int(i) for i in entry.tokenizer(args["prompt"], add_special_tokens=False)
                   ["input_ids"]]
        body = {"count": len(ids), "max_model_len": entry.loaded.max_context, "tokens": ids}
        if args["return_token_strs"]:
            body["token_strs"] = [token_string(entry.tokenizer, i) for i in ids]
    return jsonify(body)


@blp.route("/detokenize", methods=["POST"], endpoint="detokenize")
@blp.route("/v1/detokenize", methods=["POST"], endpoint="detokenize_v1")
@blp.arguments(DetokenizeRequestSchema)
@blp.response(200, DetokenizeResponseSchema)
@blp.errors(400, 404, 503)
def detokenize(args):
    """Turn token ids back into text"""
    with use_model(args["model"], task="generate") as entry:
        vocab = vocab_size(entry)
        for i, token in enumerate(args["tokens"]):
            if not 0 <= token < vocab:
                raise invalid(f"Invalid value for 'tokens[{i}]': token id {token} is outside "
                              f"this model's vocabulary (0..{vocab - 1}).", param=f"tokens[{i}]")
        text = entry.tokenizer.decode(args["tokens"], skip_special_tokens=False)
    return jsonify({"prompt": text})
