"""POST /v1/completions (OpenAI's legacy text completions)."""
from __future__ import annotations

from ..generation.tools import completion_constraint
from ..generation.run import Choice, ChoiceDelta, TokenLogprob
from ..generation.prompt import completion_prompts
from ..engine.sampling import vocab_size
from ..generation.text import token_string
from ..http.extensions import Blueprint
from ..schemas.completions import CompletionRequestSchema, CompletionSchema
from . import serving

blp = Blueprint("completions", __name__, url_prefix="/v1", description="Text completions.")


class CompletionFormat:
    """text_completion objects; streamed chunks have the same shape. With
    `echo`, each choice starts with its prompt's text."""

    id_prefix = "cmpl"
    object = chunk_object = "text_completion"

    def __init__(self, tokenizer, prompt_texts: list[str], n: int, echo: bool,
                 logprobs: bool) -> None:
        self.tokenizer = tokenizer
        self.prompt_texts = prompt_texts
        self.n = n
        self.echo = echo
        self.logprobs = logprobs

    def _echoed(self, index: int) -> str:
        return self.prompt_texts[index // self.n] if self.echo else ""

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> dict | None:
        """Legacy form, for the generated tokens (offsets count the echoed prompt)."""
        if not self.logprobs:
            return None
        shift = len(self._echoed(index))
        return {"tokens": [token_string(self.tokenizer, e.token_id) for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{token_string(self.tokenizer, t): lp for t, lp in e.top}
                                 for e in entries],
                "text_offset": [shift + e.offset for e in entries]}

    def opening(self, n_choices: int) -> list[dict]:
        if not self.echo:
            return []
        return [{"index": i, "text": self._echoed(i), "logprobs": None, "finish_reason": None}
                for i in range(n_choices)]

    def stream_choice(self, delta: ChoiceDelta) -> dict:
        return {"index": delta.index, "text": delta.text,
                "logprobs": self._logprobs(delta.index, delta.logprobs),
                "finish_reason": delta.finish_reason}

    def body_choice(self, choice: Choice) -> dict:
        return {"index": choice.index, "text": self._echoed(choice.index) + choice.text,
                "logprobs": self._logprobs(choice.index, choice.logprobs),
                "finish_reason": choice.finish_reason}


@blp.route("/completions", methods=["POST"])
@blp.arguments(CompletionRequestSchema)
@blp.response(200, CompletionSchema, description="A text_completion object; with "
              "`stream: true`, a text/event-stream of text_completion objects ending with "
              "`data: [DONE]`.")
@blp.doc(responses=serving.STREAM_DOC)
@blp.errors(400, 404, 429, 503)
def create_completion(args):
    """Create a completion

    Continues a prompt (text or token ids; an array of prompts gives one set
    of `n` choices each, indexed prompt by prompt), streaming included.
    """
    n = args.get("n") or 1

    def build(entry):
        prompts = completion_prompts(entry, args["prompt"])
        fmt = CompletionFormat(entry.tokenizer, [text for _, text in prompts], n,
                               bool(args.get("echo")), args.get("logprobs") is not None)
        serving.max_tokens(args, entry, [ids for ids, _ in prompts], "prompt")   # before compiling
        fmt.constraint = completion_constraint(args, entry, serving.stop_token_ids(entry),
                                               vocab_size(entry))
        return [ids for ids, _ in prompts], fmt

    return serving.serve(args, build, prompt_param="prompt", logprobs=args.get("logprobs"))
