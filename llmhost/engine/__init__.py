"""Everything that turns requests into tokens (or vectors).

Each loaded model gets one scheduler thread: request threads submit work and
wait on it; they never run the model themselves.
"""
from __future__ import annotations


def start(model_id: str, loaded, config):
    """The running worker for a freshly loaded model, by the task it serves."""
    if loaded.task == "embed":
        from .embed import EmbedScheduler
        return EmbedScheduler(model_id, loaded, config).start()
    if loaded.task == "rerank":
        from .rerank import RerankScheduler
        return RerankScheduler(model_id, loaded, config).start()
    if loaded.task == "transcribe":
        from .speech import SpeechWorker
        return SpeechWorker(model_id, loaded, config).start()
    from .scheduler import Scheduler
    return Scheduler(model_id, loaded, config).start()
