"""Per-request sampling settings, applied row by row inside a batch so one
request's settings never change another's output."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0          # 0 means greedy decoding
    top_p: float = 1.0
    top_k: int = 0                    # 0: off
    min_p: float = 0.0                # 0: off
    repetition_penalty: float = 1.0   # 1: off (HF's multiplicative penalty over prompt + output)
    presence_penalty: float = 0.0     # OpenAI's additive penalties over generated tokens
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: int | None = None       # None: off; k >= 0: chosen token's logprob + top k
    stop_token_ids: frozenset[int] = frozenset()   # EOS and friends: finish_reason "stop"

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
