"""`reasoning_effort` (chat) / `reasoning.effort` (responses) as chat template
variables, as vLLM passes it.

Templates that take an effort read it as ``reasoning_effort`` (gpt-oss writes
"Reasoning: high" into its system turn). Templates with an on/off switch
instead (Qwen3, SmolLM3: ``enable_thinking``) get ``enable_thinking=False``
for effort ``"none"``, so such a model answers without a thought. Only
``"none"`` turns thinking off: OpenAI's ``"minimal"`` still reasons (a little),
and an on/off template has no "a little", so ``"minimal"`` keeps thinking on
rather than silently giving a different kind of answer. What the client puts in
``chat_template_kwargs`` itself (vLLM's extra, e.g. ``{"enable_thinking":
false}``) always wins.
"""
from __future__ import annotations

OFF = ("none",)

# apply_chat_template's own arguments: a template variable of the same name
# would collide with them (or with what llmhost passes).
RESERVED = frozenset((
    "self", "conversation", "conversations", "messages", "tools", "documents", "chat_template",
    "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs"))


def template_variables(request) -> dict:
    """Extra variables for the chat template of this ChatRequest."""
    out: dict = {}
    effort = request.reasoning_effort
    if effort is not None:
        out["reasoning_effort"] = effort
        if effort in OFF:
            out["enable_thinking"] = False
    out.update(request.chat_template_kwargs or {})
    return out
