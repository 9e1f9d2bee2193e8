"""Checks of a load request that need no model: run before the registry's
"already loaded" shortcut, so that a request that would be refused for a new
load (an unknown device, remote code, a template that cannot render, a path
outside LLMHOST_MODEL_DIRS) is refused the same way when the id is loaded."""
from __future__ import annotations

import os

from jinja2 import TemplateError, TemplateSyntaxError

from . import loading
from ..engine.errors import InvalidInput, NotPermitted
from ..engine.sandbox import bounded

# What a template is tried on at load time: if it cannot render this, it can
# render no conversation, and every chat would fail.
_SAMPLE = [{"role": "system", "content": "You are helpful."},
           {"role": "user", "content": "Hello"},
           {"role": "assistant", "content": "Hi."},
           {"role": "user", "content": "How are you?"}]


def precheck(spec: loading.LoadSpec, config) -> None:
    for name in ("model", "id", "revision", "gguf_file", "chat_template"):
        value = getattr(spec, name)
        if isinstance(value, str) and "\x00" in value:
            raise InvalidInput(f"Invalid value for '{name}': it holds a NUL character.", param=name)
    if spec.trust_remote_code and not config.ALLOW_REMOTE_CODE:
        raise NotPermitted("'trust_remote_code' runs Python code from the model repository on "
                           "this server; an operator must allow it with LLMHOST_ALLOW_REMOTE_CODE=1.",
                      param="trust_remote_code", code="remote_code_not_allowed")
    loading.choose_device(spec.device)
    if spec.gguf_file is not None:
        parts = spec.gguf_file.replace("\\", "/").split("/")
        if os.path.isabs(spec.gguf_file) or ".." in parts:
            raise InvalidInput("Invalid value for 'gguf_file': give the name of a GGUF file inside the "
                               "model folder or repository (no absolute path, no '..').",
                               param="gguf_file")
    if spec.chat_template is not None:
        check_chat_template(spec.chat_template)


def check_chat_template(template: str) -> None:
    """A template that does not compile, or fails on a plain conversation, is a
    400 now rather than a 201 followed by an error on every chat."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render():
        return render_jinja_template(conversations=[_SAMPLE], chat_template=template,
                                     add_generation_prompt=True)

    try:
        rendered, _ = bounded(render, "The chat_template", "chat_template")
        if not rendered or not rendered[0]:
            raise InvalidInput("Invalid value for 'chat_template': it renders a plain conversation to "
                               "an empty prompt.", param="chat_template", code="chat_template_error")
    except TemplateSyntaxError as exc:
        raise InvalidInput(f"Invalid value for 'chat_template': it does not compile (line "
                           f"{exc.lineno}: {exc.message}).", param="chat_template",
                           code="chat_template_error")
    except InvalidInput as err:      # stopped by the sandbox's CPU budget
        raise InvalidInput(err.message, param="chat_template", code=err.code)
    except TemplateError:
        pass    # raise_exception(): the template refuses this sample, not every conversation
    except Exception as exc:
        raise InvalidInput(f"Invalid value for 'chat_template': it fails on a plain conversation "
                           f"({type(exc).__name__}: {exc}).", param="chat_template",
                           code="chat_template_error")
