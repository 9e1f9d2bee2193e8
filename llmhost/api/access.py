"""Which loaded model a request uses, and whether it may load one.

The route, not the registry, knows the caller: a model missing from the
registry is autoloaded (LLMHOST_AUTOLOAD=1, from the local cache only) when
this caller could load it with POST /v1/models.
"""
from __future__ import annotations

from contextlib import AbstractContextManager

from ..http.auth import can_manage_models
from ..config import settings
from ..models.registry import ModelEntry, registry


def use_model(model_id: str, task: str) -> AbstractContextManager[ModelEntry]:
    """registry.use with this app's settings and this caller's rights."""
    config = settings()
    return registry.use(model_id, task=task, autoload=config if can_manage_models() else None)
