"""Prompt building: chat messages through a chat template, completion prompts
as text or token ids. The ids returned here are exactly what the model sees,
and their count is ``usage.prompt_tokens``."""
from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from ..engine.errors import InvalidInput
from ..engine.sampling import vocab_size
from ..engine.sandbox import bounded

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


class PromptIds(list):
    """A prompt's token ids, plus the other inputs of its prefill forward that
    a vision-language model's processor made (pixel values and the like: the
    engine's GenerationRequest.model_inputs); empty for text models."""

    model_inputs: dict = {}


def _vision_message(message: dict, images: dict, index: int) -> dict:
    """A message as a processor's chat template takes it: content as parts,
    each `image_url` part as an `image` part holding the decoded image."""
    out = _template_message({**message, "content": ""})
    content = message.get("content")
    if isinstance(content, list):
        out["content"] = [{"type": "image", "image": images[index, j]} if part["type"] == "image_url"
                          else {"type": "text", "text": part["text"]}
                          for j, part in enumerate(content)]
    else:
        out["content"] = [{"type": "text", "text": content or ""}]
    return out


def _images(entry, messages: list[dict]) -> dict | None:
    """The decoded images of `messages` for a vision-language model (None for
    a text model, which refuses any image part)."""
    from ..config import settings
    from .images import chat_images

    if getattr(entry.loaded.pipeline, "processor", None) is not None:
        return chat_images(messages, settings())
    for i, m in enumerate(messages):
        for j, part in enumerate(m.get("content") if isinstance(m.get("content"), list) else []):
            if part.get("type") == "image_url":
                where = f"messages[{i}].content[{j}].image_url"
                raise InvalidInput(f"Invalid value for '{where}': the model '{entry.id}' takes "
                                   "text only; load a vision-language model for images.",
                                   param=where, code="images_not_supported")
    return None


def _render(entry, messages: list[dict], tools, variables, images: dict | None):
    """The tokenized conversation: through the model's processor for a
    vision-language model (images included), else its tokenizer. Control
    tokens a client writes (`<|im_start|>assistant` in a message, a tool result
    or a tool description) are encoded as text, so no client can forge turns:
    transformers' own sanitizing, unless the model was loaded with
    allow_control_tokens (docs/hardening.md)."""
    sanitize = {} if entry.spec.allow_control_tokens else {"sanitize_control_tokens": True}
    if images is None:
        return entry.tokenizer.apply_chat_template(
            [_template_message(m) for m in messages], chat_template=template_for(entry),
            add_generation_prompt=True, tokenize=True, tools=tools, **sanitize,
            **(variables or {}))
    out = entry.loaded.pipeline.processor.apply_chat_template(
        [_vision_message(m, images, i) for i, m in enumerate(messages)],
        chat_template=entry.spec.chat_template, add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt", tools=tools, **sanitize, **(variables or {}))
    ids = PromptIds(int(i) for i in out["input_ids"][0])
    ids.model_inputs = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
    return ids


def chat_prompt(entry, messages: list[dict], tools: list[dict] | None = None,
                variables: dict | None = None) -> list[int]:
    """Token ids of the conversation, with the generation prompt appended;
    `tools` go to templates that render them (generation/tools.py decides),
    `variables` are extra template variables (generation/reasoning.py). For a
    vision-language model a PromptIds, with the images' model inputs."""
    images = _images(entry, messages)    # decoded (and checked) outside the template's budget
    try:
        ids = bounded(lambda: _render(entry, messages, tools, variables, images),
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
    if isinstance(ids, PromptIds):
        return ids
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
