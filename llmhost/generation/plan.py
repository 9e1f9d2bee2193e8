"""A typed request becomes one Plan: the prompt ids the model sees, the
sampling settings (stop ids and the grammar constraint included), the stop
strings and the output parser. Every text route builds here
(:func:`build_chat`, :func:`build_completion`) and hands the Plan to
api/serving.py; the token counting routes render a conversation with
:func:`chat_ids`, the same prompt /v1/chat/completions would run.

Checks that need the model (context length, vocabulary) raise
engine.errors.InvalidInput naming the request field."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..config import settings
from ..engine.errors import InvalidInput
from ..engine.sampling import SamplingParams, vocab_size
from . import tools
from .parsing import OutputParser
from .prompt import completion_prompts
from .request import ChatRequest, CompletionRequest, TextRequest


@dataclass
class Plan:
    """One request's generation, ready to run (generation/run.py `Run`)."""

    prompts: list[list[int]]                 # token ids per prompt, exactly what the model sees
    params: SamplingParams                   # constraint and stop_token_ids included
    n: int = 1                               # choices per prompt
    stop: list[str] = field(default_factory=list)       # stop strings, matched on the text
    parser: Callable[[], OutputParser] | None = None    # tool calls and reasoning, per choice
    prompt_texts: list[str] = field(default_factory=list)   # completions: each prompt's text


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


def max_tokens(request: TextRequest, entry, prompts: list[list[int]]) -> int:
    """The completion budget per choice. An explicit max_tokens that does not
    fit the context is the client's error (OpenAI's message, with the numbers);
    the default is lowered to what fits, so short-context models just work."""
    config = settings()
    context = entry.loaded.max_context
    longest = max(len(p) for p in prompts)
    what = prompt_param = request.prompt_param
    if config.MAX_PROMPT_TOKENS and longest > config.MAX_PROMPT_TOKENS:
        raise InvalidInput(f"Your {what} resulted in {longest} tokens; this server allows at most "
                           f"{config.MAX_PROMPT_TOKENS} prompt tokens (LLMHOST_MAX_PROMPT_TOKENS).",
                           param=prompt_param, code="context_length_exceeded")
    name, asked = request.completion_budget()
    room = context - longest
    if asked is None:
        if room < 1:
            raise InvalidInput(f"This model's maximum context length is {context} tokens. However, "
                               f"your {what} resulted in {longest} tokens, which leaves no room "
                               f"for a completion. Please reduce the length of the {what}.",
                               param=prompt_param, code="context_length_exceeded")
        return min(config.DEFAULT_MAX_TOKENS, room)
    if asked > room:
        raise InvalidInput(f"This model's maximum context length is {context} tokens. However, "
                           f"you requested {longest + asked} tokens ({longest} in the {what}, "
                           f"{asked} in the completion). Please reduce the length of the {what} "
                           "or completion.", param=name, code="context_length_exceeded")
    return asked


def sampling_params(request: TextRequest, entry, prompts: list[list[int]], stop_ids,
                    vocab: int, constraint=None) -> SamplingParams:
    config = settings()

    def pick(value, default):
        return default if value is None else value

    bias = {int(k): float(v) for k, v in (request.logit_bias or {}).items()}
    for token_id in bias:
        if token_id >= vocab:
            raise InvalidInput(f"Invalid value for 'logit_bias': token id {token_id} is outside "
                               f"this model's vocabulary (0..{vocab - 1}).", param="logit_bias")
    return SamplingParams(
        max_tokens=max_tokens(request, entry, prompts),
        temperature=pick(request.temperature, config.DEFAULT_TEMPERATURE),
        top_p=pick(request.top_p, config.DEFAULT_TOP_P),
        top_k=pick(request.top_k, 0),
        min_p=pick(request.min_p, 0.0),
        repetition_penalty=pick(request.repetition_penalty, 1.0),
        presence_penalty=pick(request.presence_penalty, 0.0),
        frequency_penalty=pick(request.frequency_penalty, 0.0),
        logit_bias=bias,
        seed=request.seed,
        logprobs=request.top_logprobs_asked(),
        stop_token_ids=stop_ids,
        constraint=constraint,
    )


def chat_ids(request: ChatRequest, entry) -> tuple[list[int], tools.ChatPlan]:
    """The prompt ids of a chat request (chat template, tools, reasoning
    variables) and its tool plan with the compiled constraint and parser."""
    return tools.chat_ids(request, entry, stop_token_ids(entry), vocab_size(entry))


def build_chat(request: ChatRequest, entry) -> Plan:
    """The Plan of a chat request: /v1/chat/completions, /v1/responses and every
    API translated onto chat run through here."""
    stop_ids, vocab = stop_token_ids(entry), vocab_size(entry)
    ids, chat = tools.chat_ids(request, entry, stop_ids, vocab,
                               fits=lambda ids: max_tokens(request, entry, [ids]))
    params = sampling_params(request, entry, [ids], stop_ids, vocab, chat.constraint)
    return Plan([ids], params, n=request.choices, stop=request.stop or [], parser=chat.parser)


def build_completion(request: CompletionRequest, entry) -> Plan:
    """The Plan of a /v1/completions request (one prompt or many)."""
    stop_ids, vocab = stop_token_ids(entry), vocab_size(entry)
    prompts = completion_prompts(entry, request.prompt)
    ids = [p for p, _ in prompts]
    max_tokens(request, entry, ids)     # the context check before the grammar compiles
    constraint = tools.completion_constraint(request, entry, stop_ids, vocab)
    params = sampling_params(request, entry, ids, stop_ids, vocab, constraint)
    return Plan(ids, params, n=request.choices, stop=request.stop or [],
                prompt_texts=[text for _, text in prompts])
