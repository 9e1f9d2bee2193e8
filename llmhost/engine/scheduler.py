"""The per-model scheduler: one thread that decodes every running request of a
model together (continuous batching). Request threads submit and wait."""
from __future__ import annotations

from dataclasses import dataclass, field

from .sampling import SamplingParams


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1


@dataclass
class TokenEvent:
    """One generated token of choice `index`. `finish_reason` is set on the
    choice's last event ('stop': a stop token, which is included as token_id;
    'length': max_tokens reached)."""

    index: int
    token_id: int
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Scheduler:
    def __init__(self, entry, config):
        pass

    def close(self, reason):
        pass
