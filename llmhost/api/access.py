"""Which loaded model a request uses (ids, and aliases: the load option
`aliases` and LLMHOST_MODEL_ALIASES), and whether it may load one.

The route, not the registry, knows the caller: a model missing from the
registry is autoloaded (LLMHOST_AUTOLOAD=1, from the local cache only) when
this caller could load it with POST /v1/models.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ..http import metering
from ..http.auth import can_manage_models
from ..config import settings
from ..models.registry import ModelEntry, registry


def resolve(model_id: str) -> str:
    """The id a request's `model` names: a loaded id or a load-option alias as
    it is (the registry knows those), else an alias of LLMHOST_MODEL_ALIASES."""
    if registry.find(model_id) is not None:
        return model_id
    return settings().MODEL_ALIASES.get(model_id, model_id)


def aliases() -> dict[str, str]:
    """Every alias that reaches a loaded model now -> that model's id (an alias
    equal to a loaded id is not one: the id wins)."""
    loaded = registry.list()
    ids = {e.id for e in loaded}
    out = {alias: e.id for e in loaded for alias in e.spec.aliases or ()}
    out.update({alias: target for alias, target in settings().MODEL_ALIASES.items()
                if target in ids})
    return {alias: target for alias, target in out.items() if alias not in ids}


@contextmanager
def use_model(model_id: str, task: str) -> Iterator[ModelEntry]:
    """registry.use with this app's settings and this caller's rights, once the
    caller's requests-per-minute limit admits it (http/metering.py)."""
    metering.admit_request()
    config = settings()
    with registry.use(resolve(model_id), task=task,
                      autoload=config if can_manage_models() else None) as entry:
        metering.reached(entry.id)
        yield entry
