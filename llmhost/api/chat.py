"""POST /v1/chat/completions."""
from __future__ import annotations

from ..generation import tools
from ..generation.run import Choice, ChoiceDelta, TokenLogprob
from ..generation.text import token_bytes, token_string
from ..http.extensions import Blueprint
from ..schemas.chat import ChatCompletionRequestSchema, ChatCompletionSchema
from . import serving

blp = Blueprint("chat", __name__, url_prefix="/v1", description="Chat completions.")


class ChatFormat:
    """chat.completion bodies and chat.completion.chunk stream choices."""

    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, tokenizer, logprobs: bool, legacy_functions: bool = False) -> None:
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        # The request used the deprecated `functions`: answer with `function_call`.
        self.legacy = legacy_functions
        self.constraint = None      # set by build(): read by serving.start
        self.parser = None

    def _token(self, token_id: int, logprob: float) -> dict:
        return {"token": token_string(self.tokenizer, token_id), "logprob": logprob,
                "bytes": list(token_bytes(self.tokenizer, token_id))}

    def _logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": [{**self._token(e.token_id, e.logprob),
                             "top_logprobs": [self._token(t, lp) for t, lp in e.top]}
                            for e in entries],
                "refusal": None}

    def opening(self, n_choices: int) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for i in range(n_choices)]

    def _finish(self, reason: str | None) -> str | None:
        return "function_call" if self.legacy and reason == "tool_calls" else reason

    def stream_choice(self, delta: ChoiceDelta) -> dict:
        out: dict = {"content": delta.text} if delta.text else {}
        if delta.reasoning:
            out["reasoning_content"] = delta.reasoning
        if delta.tool_calls and self.legacy:
            out["function_call"] = {k: v for k, v in delta.tool_calls[0]["function"].items()
                                    if k == "arguments" or v}
        elif delta.tool_calls:
            out["tool_calls"] = delta.tool_calls
        return {"index": delta.index, "delta": out,
                "logprobs": self._logprobs(delta.logprobs),
                "finish_reason": self._finish(delta.finish_reason)}

    def body_choice(self, choice: Choice) -> dict:
        message = {"role": "assistant", "content": choice.text, "refusal": None}
        if choice.tool_calls:
            message["content"] = choice.text if choice.text.strip() else None
            if self.legacy:
                message["function_call"] = choice.tool_calls[0]["function"]
            else:
                message["tool_calls"] = choice.tool_calls
        if choice.reasoning is not None:
            message["reasoning_content"] = choice.reasoning
        return {"index": choice.index, "message": message,
                "logprobs": self._logprobs(choice.logprobs),
                "finish_reason": self._finish(choice.finish_reason)}


@blp.route("/chat/completions", methods=["POST"])
@blp.arguments(ChatCompletionRequestSchema)
@blp.response(200, ChatCompletionSchema, description="A chat.completion object; with "
              "`stream: true`, a text/event-stream of chat.completion.chunk objects ending "
              "with `data: [DONE]`.")
@blp.doc(responses=serving.STREAM_DOC)
@blp.errors(400, 404, 429, 503)
def create_chat_completion(args):
    """Create a chat completion

    The conversation is rendered with the model's chat template (or the one
    given at load time, or llmhost's fallback for base models) and answered by
    the model, as OpenAI's API does, streaming included.
    """
    want_logprobs = bool(args.get("logprobs"))
    return serving.serve(args, chat_build(args), prompt_param="messages",
                         logprobs=(args.get("top_logprobs") or 0) if want_logprobs else None)


def chat_build(args: dict, counting: bool = False):
    """The prompt and formatter of chat-shaped `args`: /v1/responses and the
    token counting routes (`counting`: no room for a completion needed) build
    through this too, so every route renders a conversation one way."""
    want_logprobs = bool(args.get("logprobs"))

    def build(entry):
        fits = None if counting else (
            lambda ids: serving.max_tokens(args, entry, [ids], "messages"))
        ids, plan = tools.build_chat(args, entry, serving.stop_token_ids(entry), fits)
        fmt = ChatFormat(entry.tokenizer, want_logprobs,
                         legacy_functions=bool(args.get("functions")))
        fmt.constraint, fmt.parser = plan.constraint, plan.parser
        return [ids], fmt

    return build
