"""Prompt building: chat messages through a chat template, completion prompts
as text or token ids. The ids returned here are exactly what the model sees,
and their count is ``usage.prompt_tokens``."""
from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from ..engine.sandbox import bounded
from ..engine.sampling import vocab_size
from ..engine.errors import InvalidInput

# For base models that ship no chat template (gpt2 and most base checkpoints):
# plain "Role: text" turns, which a base model continues naturally, ending with
# "Assistant:" so the model writes the answer. Documented in the README.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize + ': ' + message['content'] + '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def template_for(entry) -> str | None:
    """The template a model uses: the one given at load time, else its own,
    else the fallback. None means the tokenizer's own."""
    if entry.spec.chat_template:
        return entry.spec.chat_template
    if getattr(entry.tokenizer, "chat_template", None):
        return None
    return FALLBACK_TEMPLATE


def _template_message(message: dict) -> dict:
    """The message as chat templates expect it: string content, developer as
    system (templates only know system), optional name / tool_call_id kept."""
    role = "system" if message["role"] == "developer" else message["role"]
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(part["text"] for part in content)
    out: dict[str, Any] = {"role": role, "content": content or ""}
    for key in ("name", "tool_call_id", "tool_calls", "tool_responses"):
        if message.get(key):
            out[key] = message[key]
    return out


def chat_prompt(entry, messages: list[dict], tools: list[dict] | None = None,
                variables: dict | None = None) -> list[int]:
    """Token ids of the conversation, with the generation prompt appended;
    `tools` go to templates that render them (generation/tools.py decides),
    `variables` are extra template variables (generation/reasoning.py)."""
    tokenizer = entry.tokenizer
    try:
        ids = bounded(lambda: tokenizer.apply_chat_template(
            [_template_message(m) for m in messages], chat_template=template_for(entry),
            add_generation_prompt=True, tokenize=True, tools=tools, **(variables or {})),
            f"The chat template of model '{entry.id}'", "messages")
    except TemplateError as exc:
        # Templates reject conversations they cannot render (e.g. roles that do
        # not alternate) with raise_exception(); that is the client's input.
        raise InvalidInput(f"The chat template of model '{entry.id}' refused these messages: {exc}",
                      param="messages", code="chat_template_error")
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError,
            RecursionError) as exc:
        # A template that fails on these messages (e.g. `content + 1`): the
        # template and the messages together cannot render, never a 500.
        raise InvalidInput(f"The chat template of model '{entry.id}' failed on these messages "
                           f"({type(exc).__name__}: {exc}).", param="messages",
                           code="chat_template_error")
    # transformers 5 returns a BatchEncoding when tokenizing; 4.x a list.
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    if not len(ids):
        raise InvalidInput(f"The chat template of model '{entry.id}' rendered these messages to "
                           "an empty prompt.", param="messages", code="chat_template_error")
    return [int(i) for i in ids]




def empty_prompt_ids(entry) -> list[int]:
    """An empty prompt starts from the beginning-of-text token, as GPT-2 was
    trained (OpenAI answers an empty prompt too)."""
    tokenizer = entry.tokenizer
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise InvalidInput("'prompt' is empty and this model has no beginning-of-text token to start "
                      "from.", param="prompt")
    return [int(start)]


def completion_prompts(entry, prompt: str | list) -> list[tuple[list[int], str]]:
    """(ids, text) per prompt. `prompt` is a string, a list of strings, a list
    of token ids or a list of lists of token ids (the schema checked which)."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    vocab = vocab_size(entry)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = [int(t) for t in entry.tokenizer(item)["input_ids"]]
            text = item
        else:
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                where = "prompt" if len(items) == 1 and not isinstance(prompt[0], list) else f"prompt[{i}]"
                raise InvalidInput(f"Token id {bad[0]} in '{where}' is outside this model's vocabulary "
                              f"(0..{vocab - 1}).", param=where)
            ids = list(item)
            text = entry.tokenizer.decode(ids, skip_special_tokens=False)
        out.append((ids or empty_prompt_ids(entry), text))
    return out
