"""Everything that turns requests into tokens (or vectors).

Each loaded model gets one scheduler thread (DESIGN rule 7): request threads
submit work and wait on it; they never run the model themselves.
"""
from __future__ import annotations


def start(entry, config):
    """The scheduler for a freshly loaded model, by the task it serves."""
    if entry.task == "embed":
        from .embed import EmbedScheduler
        return EmbedScheduler(entry, config)
    from .scheduler import Scheduler
    return Scheduler(entry, config)
