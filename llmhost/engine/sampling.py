"""Per-request sampling settings, applied row by row inside a batch so one
request's settings never change another's output."""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import torch

# A temperature below this is greedy decoding (vLLM uses the same epsilon):
# dividing logits by 1e-300 overflows to inf and the softmax to NaN.
GREEDY_EPSILON = 1e-5
# The log probability reported for a token the model gives no chance at all
# (-inf, or NaN from an overflow): finite, as OpenAI's -9999.0, because JSON
# has no -Infinity or NaN.
LOGPROB_FLOOR = -9999.0
_SEED_SPACE = 2 ** 64    # torch.Generator.manual_seed takes 0 .. 2**64 - 1


def finite_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """-inf and NaN become LOGPROB_FLOOR, so no log probability breaks a JSON body."""
    return torch.nan_to_num(logp, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR).clamp(min=LOGPROB_FLOOR)


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
    constraint: Any = None            # engine.constrain.Constraint: a grammar every row follows

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def argmax_only(self) -> bool:
        """Nothing to do but argmax: such rows are decoded with one batched argmax."""
        return (self.greedy and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty and not self.logit_bias and self.logprobs is None
                and self.constraint is None)


class RowSampler:
    """The sampling state of one sequence (one choice of one request): its own
    random generator (a seed never touches the global torch RNG, so the same
    seed gives the same output whatever else the server does) and the token
    statistics its penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int,
                 index: int) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            # seed + index, reduced modulo 2**64 (what manual_seed accepts): any
            # 64-bit seed, negative or not, works for every choice.
            seed = params.seed + index if params.seed is not None else secrets.randbits(62)
            self.generator = torch.Generator().manual_seed(seed % _SEED_SPACE)
        self.seen: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32)
        self.bias_ids = self.bias_values = None
        if params.logit_bias:
            self.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
            self.bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
        # The row's own grammar state (constrained decoding, engine/constrain.py).
        self.matcher = params.constraint.matcher() if params.constraint is not None else None

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties and bias: the distribution the token is chosen from (and
        whose log-probabilities are reported)."""
        p = self.params
        if self.seen is not None:
            penalised = torch.where(logits < 0, logits * p.repetition_penalty,
                                    logits / p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.counts is not None:
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0)
        if self.bias_ids is not None:
            logits = logits.index_add(0, self.bias_ids, self.bias_values)
        return logits

    def choose(self, logits: torch.Tensor) -> int:
        p = self.params
        if self.matcher is not None:   # after process(): logprobs stay those of the model
            logits = self.matcher.mask(logits)
        if p.greedy:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > p.top_p   # keeps at least the top token
            probs = probs.scatter(0, order[drop], 0.0)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    @property
    def grammar_done(self) -> bool:
        return self.matcher is not None and self.matcher.done

    def observe(self, token_id: int) -> None:
        if self.matcher is not None:
            self.matcher.accept(token_id)
        if self.seen is not None:
            self.seen[token_id] = True
        if self.counts is not None:
            self.counts[token_id] += 1

    def logprobs(self, logits: torch.Tensor, token_id: int) -> tuple[float, list[tuple[int, float]]]:
        logp = finite_logprobs(torch.log_softmax(logits, dim=-1))
        k = self.params.logprobs or 0
        top: list[tuple[int, float]] = []
        if k > 0:
            values, ids = torch.topk(logp, k)
            top = list(zip(ids.tolist(), values.tolist()))
        return float(logp[token_id]), top


def vocab_size(entry) -> int:
    """Token ids the model has logits for (may exceed the tokenizer's size); of
    a registry entry or a loaded model."""
    head = entry.model.get_output_embeddings()
    if head is not None and hasattr(head, "out_features"):   # a Linear, a PackedLinear
        return int(head.out_features)
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return len(entry.tokenizer)
