"""Per-request sampling settings, applied row by row inside a batch so one
request's settings never change another's output."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# A temperature below this is greedy decoding (vLLM uses the same epsilon):
# dividing logits by 1e-300 overflows to inf and the softmax to NaN.
GREEDY_EPSILON = 1e-5
# The log probability reported for a token the model gives no chance at all
# (-inf, or NaN from an overflow): finite, as OpenAI's -9999.0, because JSON
# has no -Infinity or NaN.
LOGPROB_FLOOR = -9999.0
_SEED_SPACE = 2 ** 64    # torch.Generator.manual_seed takes 0 .. 2**64 - 1
# top_p looks for its nucleus among this many of the most probable tokens first
# (torch.topk: ~50 us on a 49,152-token vocabulary), and sorts the whole
# vocabulary only when their probabilities add up to no more than top_p.
NUCLEUS_FIRST = 64


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
        """The next token: the argmax, or a draw from what ``distribution``
        leaves with the row's own generator."""
        if self.matcher is not None:   # after process(): logprobs stay those of the model
            logits = self.matcher.mask(logits)
        if self.params.greedy:
            return int(torch.argmax(logits))
        return _draw(*self.distribution(logits), self.generator)

    def distribution(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a sampled token is drawn from: temperature, then top_k, min_p and
        top_p applied to `logits` (the order and rules of HF's warpers as this
        file always had them: min_p's zeros stay in top_p's sums). (probabilities,
        their token ids) where only some are left, most probable first, else
        (the vocabulary's probabilities, None); not normalized after a cut.

        Why not torch.multinomial over a sorted vocabulary: on the CPU torch.sort
        took 2.8 ms and torch.multinomial 0.7 ms for SmolLM2's 49,152 logits (two
        threads), more than its whole int4 decode step (~2.5 ms), for every
        sampled row and token. Here the candidates come from torch.topk or numpy's
        sort (84 us) and the draw is one uniform number against the cumulative
        probabilities (``_draw``)."""
        p = self.params
        logits = logits / p.temperature
        ids = None
        if 0 < p.top_k < logits.shape[-1]:
            logits, ids = torch.topk(logits, p.top_k)
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            probs, ids = _nucleus(probs, ids, p.top_p)
        return probs, ids

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


def _kept(cum: torch.Tensor, top_p: float) -> int:
    """How many tokens top_p keeps of those whose probabilities (most probable
    first) add up to `cum`: a token whose more probable tokens add up to at most
    top_p (the first always)."""
    above = int(torch.searchsorted(cum, cum.new_tensor([top_p]), right=True))
    return 1 + min(above, len(cum) - 1)


def _nucleus(probs: torch.Tensor, ids: torch.Tensor | None, top_p: float
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """top_p's nucleus (``_kept``) of `probs`: the candidates' (`ids`, most probable
    first) or the whole vocabulary's (`ids` None); returned the same way, the
    others' probabilities gone or set to 0."""
    if ids is None and probs.shape[-1] > NUCLEUS_FIRST and float(probs.max()) * NUCLEUS_FIRST > top_p:
        values, top = torch.topk(probs, NUCLEUS_FIRST)
        cum = torch.cumsum(values, 0)
        if float(cum[-1]) > top_p:   # the nucleus ends among them
            count = _kept(cum, top_p)
            return values[:count], top[:count]
    if ids is not None:
        count = _kept(torch.cumsum(probs, 0), top_p)
        return probs[:count], ids[:count]
    # a flat distribution: the probabilities sorted (numpy's sort: torch.sort is 30x
    # slower here) give the smallest one kept; the tokens above it and enough of its ties
    ranked = torch.from_numpy(np.sort(probs.numpy())).flip(0)
    count = _kept(torch.cumsum(ranked, 0), top_p)
    edge = ranked[count - 1]
    keep = probs > edge
    keep[(probs == edge).nonzero().flatten()[:count - int(keep.sum())]] = True
    return probs * keep, None


def _draw(probs: torch.Tensor, ids: torch.Tensor | None, generator: torch.Generator | None) -> int:
    """A token drawn with probability proportional to `probs` (of the tokens
    `ids`, or of the vocabulary): a uniform number against their cumulative sum
    in float64. ValueError when no token has a finite, positive probability
    (logits of inf or NaN): the row fails alone, as torch.multinomial's error did."""
    cum = torch.cumsum(probs, 0, dtype=torch.float64)
    total = float(cum[-1])
    if not (total > 0 and math.isfinite(total)):
        raise ValueError("the model's probabilities are not finite: no token can be sampled")
    u = torch.rand(1, dtype=torch.float64, generator=generator) * total
    # (u rounded up to the total would fall past the last token with a probability)
    i = min(int(torch.searchsorted(cum, u, right=True)), int(torch.searchsorted(cum, cum[-1:])))
    return int(ids[i]) if ids is not None else i


def vocab_size(entry) -> int:
    """Token ids the model has logits for (may exceed the tokenizer's size); of
    a registry entry or a loaded model."""
    head = entry.model.get_output_embeddings()
    if head is not None and hasattr(head, "out_features"):   # a Linear, a PackedLinear
        return int(head.out_features)
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return len(entry.tokenizer)
