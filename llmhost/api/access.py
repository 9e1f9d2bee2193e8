"""Which loaded model a request uses, and whether it may load one.

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


@contextmanager
def use_model(model_id: str, task: str) -> Iterator[ModelEntry]:
    """registry.use with this app's settings and this caller's rights, once the
    caller's requests-per-minute limit admits it (http/metering.py)."""
    metering.admit_request()
    config = settings()
    with registry.use(model_id, task=task,
                      autoload=config if can_manage_models() else None) as entry:
        metering.reached(entry.id)
        yield entry
