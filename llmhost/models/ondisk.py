"""Model files on this machine that load offline, for GET /v1/models?include=cached
and `llmhost models`: the Hugging Face cache (cached_models) and the ``.gguf``
files and model folders under LLMHOST_MODEL_DIRS (local_models)."""
from __future__ import annotations

import os
import time

MAX_DEPTH = 3          # folders below each root that are searched
MAX_ENTRIES = 1000     # listed at most, so a huge tree cannot stall the request
MODEL_FILES = ("config.json", "modules.json")


def is_path(value: str | None) -> bool:
    """Whether a model id or source names a server path (not a hub id)."""
    return bool(value) and (value.startswith(("/", "./", "../", "~")) or os.sep in value
                            and os.path.exists(value))


def _size(folder: str) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def local_models(roots: list[str]) -> list[dict]:
    """One entry per `.gguf` file and per model folder (holding config.json or
    modules.json) found under `roots`; `id` is the path to give POST /v1/models."""
    found: list[dict] = []
    for root in roots:
        root = os.path.realpath(os.path.expanduser(root))
        if not os.path.isdir(root):
            continue
        base_depth = root.rstrip(os.sep).count(os.sep)
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if folder.count(os.sep) - base_depth >= MAX_DEPTH:
                dirs[:] = []
            if any(name in files for name in MODEL_FILES):
                found.append(_entry(folder, "folder", _size(folder)))
                dirs[:] = []  # a model's own subfolders (1_Pooling, ...) are not models
                continue
            for name in sorted(files):
                if name.endswith(".gguf"):
                    path = os.path.join(folder, name)
                    found.append(_entry(path, "gguf", os.path.getsize(path)))
            if len(found) >= MAX_ENTRIES:
                return found[:MAX_ENTRIES]
    return found


def _entry(path: str, kind: str, size: int) -> dict:
    return {"id": path, "object": "model", "created": int(os.path.getmtime(path)),
            "owned_by": "local", "status": "cached", "format": kind, "size_on_disk": size}


def cached_models() -> list[dict]:
    """Models in the local HF cache that could be loaded offline."""
    from huggingface_hub import scan_cache_dir
    try:
        info = scan_cache_dir()
    except Exception:  # no cache folder yet
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model" or not repo.refs:
            continue
        out.append({"id": repo.repo_id, "created": int(repo.last_modified or time.time()),
                    "revision": next(iter(repo.revisions)).commit_hash if repo.revisions else None,
                    "size_on_disk": repo.size_on_disk})
    return out
