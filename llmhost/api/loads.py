"""Loading a model for a request: POST /v1/models and Ollama's /api/pull run
this one path (registry.load, the crash journal, progress events). Not a
blueprint."""
from __future__ import annotations

import threading
import time

from flask import current_app

from ..config import settings
from ..http.checks import longest_token_chars
from ..models import journal, progress
from ..models.loading import LoadSpec
from ..models.registry import ModelEntry, registry

PROGRESS_EVERY = 0.25  # seconds between progress events at most (and a heartbeat)
MIN_GAP = 0.05        # seconds between progress events at least


def load(spec: LoadSpec, args: dict, config=None) -> tuple[ModelEntry, bool]:
    """registry.load, and a journal entry when it loaded now (so the model is
    reloaded if the worker crashes). `args`: the load options as sent."""
    entry, created = registry.load(spec, config or settings())
    if created:
        journal.record(args, entry.id)
        warm(entry)
    return entry, created


def warm(entry: ModelEntry) -> None:
    """Work of a chat model's first request done by its load instead: the prompt
    check's longest token (18 ms for SmolLM2's vocabulary). Not a first chat's
    prompt (its template compiled: 33-37 against 41-51 ms for the first answer
    in process), measured to leave the worker 4 MiB larger right after the load
    (346 against 342 MiB: issue 20 bounds that figure)."""
    if entry.task == "generate" and entry.tokenizer is not None:
        longest_token_chars(entry.tokenizer)


def load_events(spec: LoadSpec, args: dict):
    """Start the load on its own thread, so that a client who goes away does not
    stop it halfway (it finishes and stays loaded, as a non-streamed load would);
    the events are progress dicts (`object: model.load.progress`) while it runs,
    then the Model object. An error of the load is raised from the events."""
    outcome: dict = {}
    app = current_app._get_current_object()
    config = settings()

    def run() -> None:
        with app.app_context():
            try:
                outcome["entry"], _ = load(spec, args, config)
            except BaseException as exc:  # handed to the stream, which renders it
                outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"llmhost-load-{spec.served_id}", daemon=True)
    thread.start()

    def events():
        version, tracker = -1, None
        while thread.is_alive():
            tracker = progress.get(spec.served_id) or tracker
            if tracker is None or tracker.finished:
                thread.join(PROGRESS_EVERY)
                continue
            if tracker.version != version:
                version = tracker.version
                yield {**tracker.to_dict(), "object": "model.load.progress"}
                time.sleep(MIN_GAP)  # a load of thousands of tensors: not one event each
            tracker.wait(version, PROGRESS_EVERY)
        if "error" in outcome:
            raise outcome["error"]
        if tracker is not None and tracker.version != version:
            # A small load can finish between two polls: its last counts still come.
            yield {**tracker.to_dict(), "object": "model.load.progress"}
        yield outcome["entry"].to_openai()

    return events()
