"""Typed requests: what the chat and completions schemas load into
(schemas/generation.py `post_load`), so the generation layer reads attributes
with types instead of dict keys. Nested parts (messages, tools,
response_format, structured_outputs) stay the plain JSON-shaped dicts the
schemas checked: chat templates and grammars take them in that shape.

/v1/responses (and any other API translated onto chat) builds a chat request
body and loads it through the chat schema, so every route gets a ChatRequest."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class TextRequest:
    """Fields /v1/chat/completions and /v1/completions share (GenerationSchema).
    None means "the server's default"."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop: list[str] | None = None
    n: int | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    user: str | None = None
    response_format: dict | None = None        # json_schema.schema under "schema", as OpenAI writes it
    structured_outputs: dict | None = None
    cache_salt: str | None = None              # a prefix cache partition (engine/prefixcache.py)

    prompt_param = "prompt"     # the field a prompt error names

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def choices(self) -> int:
        return self.n or 1

    def prompt_input(self) -> Any:
        """The prompt as the client sent it (for size checks and content logs)."""
        return getattr(self, self.prompt_param)

    def prompt_count(self) -> int:
        return 1

    def completion_budget(self) -> tuple[str, int | None]:
        """(name, value) of the max-tokens field the client used."""
        return "max_tokens", self.max_tokens

    def top_logprobs_asked(self) -> int | None:
        """Alternatives per token when logprobs are asked for, else None."""
        return None

    def template_kwargs(self) -> dict | None:
        """Extra chat template variables the client sets (rendered into the prompt)."""
        return None


@dataclass(kw_only=True)
class ChatRequest(TextRequest):
    """POST /v1/chat/completions (ChatCompletionRequestSchema)."""

    messages: list[dict] = field(default_factory=list)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    metadata: dict | None = None
    store: bool | None = None
    parallel_tool_calls: bool | None = None
    tools: list[dict] | None = None
    tool_choice: Any = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict | None = None
    functions: list[dict] | None = None        # deprecated form of tools
    function_call: Any = None                  # deprecated form of tool_choice

    prompt_param = "messages"

    def completion_budget(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_kwargs(self) -> dict | None:
        return self.chat_template_kwargs


@dataclass(kw_only=True)
class CompletionRequest(TextRequest):
    """POST /v1/completions (CompletionRequestSchema)."""

    prompt: str | list
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def prompt_count(self) -> int:
        """How many prompts the request holds (an array of texts or of id lists)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return len(prompt)
        return 1

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs
