"""POST /v1/chat/completions."""
from __future__ import annotations

from ..engine.outputs import Choice, ChoiceDelta, TokenLogprob
from ..engine.prompt import chat_prompt
from ..engine.text import token_bytes, token_string
from ..extensions import Blueprint
from ..schemas.chat import ChatCompletionRequestSchema, ChatCompletionSchema
from . import serving

blp = Blueprint("chat", __name__, url_prefix="/v1", description="Chat completions.")


class ChatFormat:
    """chat.completion bodies and chat.completion.chunk stream choices."""

    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, tokenizer, logprobs: bool) -> None:
        self.tokenizer = tokenizer
        self.logprobs = logprobs

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

    def stream_choice(self, delta: ChoiceDelta) -> dict:
        return {"index": delta.index, "delta": {"content": delta.text} if delta.text else {},
                "logprobs": self._logprobs(delta.logprobs), "finish_reason": delta.finish_reason}

    def body_choice(self, choice: Choice) -> dict:
        return {"index": choice.index,
                "message": {"role": "assistant", "content": choice.text, "refusal": None},
                "logprobs": self._logprobs(choice.logprobs),
                "finish_reason": choice.finish_reason}


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


def chat_build(args: dict):
    """The prompt and formatter of chat-shaped `args`: /v1/responses and the
    token counting routes build through this too, so every route renders a
    conversation one way."""
    want_logprobs = bool(args.get("logprobs"))

    def build(entry):
        return [chat_prompt(entry, args["messages"])], ChatFormat(entry.tokenizer, want_logprobs)

    return build
