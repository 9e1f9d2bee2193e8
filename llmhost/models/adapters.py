"""LoRA adapters loaded onto a loaded base model at run time, with PEFT.

PEFT (the library that trains and saves these adapters) injects each adapter's
LoRA layers into the base model's modules, next to the base weights: nothing
is merged into the weights the base and the other adapters share. Every
forward of the base's scheduler then names each row's adapter (PEFT's
``"__base__"`` for the base alone), and PEFT's LoRA layers apply each adapter
to its own rows of the batch (PEFT's mixed-adapter batches, ``adapter_names``),
so requests for the base and for several adapters decode in one batch.

Adding and removing adapters changes the model's modules, so it runs on the
scheduler thread between two steps (``Scheduler.between_steps``).
"""
from __future__ import annotations

import hashlib
import os
from contextlib import AbstractContextManager

from ..engine.errors import ModelClosed
from ..engine.scheduler import GenerationRequest
from ..engine.errors import InvalidInput


def is_adapter(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "adapter_config.json"))


def peft_name(served_id: str) -> str:
    """PEFT's name for the adapter served as `served_id` (a module key: no dots
    or slashes, and never PEFT's "__base__")."""
    return "adapter_" + hashlib.sha256(served_id.encode()).hexdigest()[:16]


class AdapterSet:
    """The adapters of one base model: its PeftModel wrapper (created with the
    first adapter, removed with the last) and the forward context its
    scheduler uses while it holds any (``Scheduler.adapter_context``)."""

    def __init__(self, peft) -> None:
        self.peft = peft

    def __call__(self, names: list[str]) -> AbstractContextManager:
        return self.peft.base_model._enable_peft_forward_hooks(adapter_names=names)


def attach(scheduler, name: str, folder: str, model_name: str) -> int:
    """Load the adapter in `folder` onto the base `scheduler` drives, as `name`;
    returns the adapter's parameter count."""
    from peft import PeftConfig, PeftModel

    try:
        config = PeftConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInput(f"Could not read the PEFT adapter '{model_name}': {exc}", param="model",
                           code="model_load_failed")
    if config.peft_type != "LORA":
        raise InvalidInput(f"'{model_name}' is a {config.peft_type} adapter; llmhost loads LoRA "
                           "adapters onto a base at run time.", param="model", code="model_load_failed")

    def add() -> int:
        adapters: AdapterSet | None = scheduler.adapter_context
        try:
            if adapters is None:
                peft = PeftModel.from_pretrained(scheduler.model, folder, adapter_name=name,
                                                 is_trainable=False)
                adapters = AdapterSet(peft)
            else:
                adapters.peft.load_adapter(folder, adapter_name=name, is_trainable=False)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            if scheduler.adapter_context is None and adapters is not None:
                adapters.peft.base_model.unload()
            raise InvalidInput(f"Could not load the adapter '{model_name}' onto this base: {exc}",
                               param="model", code="model_load_failed")
        adapters.peft.eval()
        scheduler.adapter_context = adapters
        return sum(p.numel() for n, p in scheduler.model.named_parameters()
                   if f".{name}." in n and "lora_" in n)

    return scheduler.between_steps(add)


def detach(scheduler, name: str, reason: str) -> None:
    """Remove adapter `name`: its requests end with `reason`; with the last
    adapter gone the base model's modules are its own again."""
    def remove() -> None:
        adapters: AdapterSet | None = scheduler.adapter_context
        scheduler.end_adapter(name, ModelClosed(reason))
        if adapters is None or name not in adapters.peft.peft_config:
            return
        if len(adapters.peft.peft_config) == 1:
            adapters.peft.base_model.unload()    # the LoRA layers out, never merged
            scheduler.adapter_context = None
        else:
            adapters.peft.delete_adapter(name)

    try:
        scheduler.between_steps(remove)
    except ModelClosed:   # the base went first: nothing is left to remove
        pass


class AdapterEngine:
    """An adapter's engine: its base's scheduler, with the adapter named on
    every request it submits."""

    def __init__(self, base, name: str) -> None:
        self.base = base
        self.name = name

    def submit(self, request: GenerationRequest):
        request.adapter = self.name
        return self.base.submit(request)

    def close(self, reason: str) -> None:
        detach(self.base, self.name, reason)
