"""Automatic prefix caching (issue 19): the KV cache of recent prompts of one
model, so that a request starting with tokens the model already read (an
agent loop resending its conversation, a shared system prompt) prefills only
the rest. Whole prefill chunks of prompts, not generated tokens, or, where a
model's rows are computed alone, any tokens: the scheduler says why
(``Scheduler._fill_step``, ``Scheduler.exact_rows``).

A store of whole sequences, not hashed blocks or a radix tree. vLLM hashes
fixed-size blocks because its KV lives in a paged GPU pool shared by
thousands of sequences; SGLang's radix tree shares nodes between them. Here a
model's KV is a transformers ``DynamicCache`` of plain per-row tensors, and a
memory budget of a few hundred MiB holds tens of sequences, not thousands:
finding the longest common prefix is one vectorised comparison per stored
sequence (microseconds, see docs/prefix-caching.md), reusing it is one slice
per layer, and nothing about the engine's cache layout has to change. What a
tree would add, sharing one copy of a common prefix between sequences, is won
for the case that matters (an agent loop) by superseding: a sequence that
extends a stored one replaces it, so a ten-turn loop holds one entry, not ten.

Entries are partitioned (``partition``: a hash of the request's
``cache_salt`` and, with LLMHOST_PREFIX_CACHE_PER_KEY, of its API key): a
lookup only sees its own partition. One store per model, so a prefix never
crosses models. Least-recently-used entries go first when the budget is
reached; everything goes when the model is unloaded (``clear``).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from . import metrics


@dataclass
class Entry:
    partition: str
    tokens: np.ndarray                       # int64, the positions `kv` holds
    kv: list[tuple[torch.Tensor, torch.Tensor]]   # per layer, [heads, len(tokens), head_dim]
    nbytes: int


@dataclass
class Hit:
    entry: Entry
    length: int                              # tokens of the prompt found in `entry`

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.entry.kv[index]
        return keys[:, :self.length], values[:, :self.length]


def common_prefix(stored: np.ndarray, tokens: np.ndarray) -> int:
    """Length of the common prefix of two token arrays."""
    m = min(len(stored), len(tokens))
    if m == 0:
        return 0
    same = stored[:m] == tokens[:m]
    return m if same.all() else int(same.argmin())


class PrefixStore:
    """Recent sequences of one model, within `budget` bytes. Used by the
    model's scheduler thread; `stats` may be read from any thread."""

    def __init__(self, model_id: str, budget: int) -> None:
        self.model_id = model_id
        self.budget = max(0, int(budget))
        self._entries: OrderedDict[int, Entry] = OrderedDict()   # least recently used first
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.tokens_reused = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, partition: str, prompt: list[int], block: int = 1) -> Hit | None:
        """The stored sequence sharing the longest prefix with `prompt`, at most
        all of it but its last token (whose logits the request needs), in
        whole `block`s (the scheduler's prefill chunks: see ``Scheduler``)."""
        tokens = np.asarray(prompt[:-1], dtype=np.int64)
        best: Hit | None = None
        with self._lock:
            for key, entry in self._entries.items():
                if entry.partition != partition:
                    continue
                length = common_prefix(entry.tokens, tokens) // block * block
                if length and (best is None or length > best.length):
                    best = Hit(entry, length)
            if best is None:
                return None
            self._entries.move_to_end(id(best.entry))
            self.hits += 1
            self.tokens_reused += best.length
        metrics.observe_prefix_hit(self.model_id, best.length)
        return best

    def match(self, partition: str, prompt: list[int]) -> int:
        """How many of `prompt`'s tokens (all but its last) a lookup would
        reuse, without counting it as a hit."""
        tokens = np.asarray(prompt[:-1], dtype=np.int64)
        with self._lock:
            return max((common_prefix(e.tokens, tokens) for e in self._entries.values()
                        if e.partition == partition), default=0)

    def holds(self, partition: str, tokens: list[int]) -> bool:
        """Whether a stored sequence already holds all of `tokens` (then
        there is nothing to copy)."""
        array = np.asarray(tokens, dtype=np.int64)
        with self._lock:
            return any(e.partition == partition and common_prefix(e.tokens, array) == len(array)
                       for e in self._entries.values())

    def insert(self, partition: str, tokens: list[int],
               kv: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Keep `kv` (per layer [heads, len(tokens), head_dim], owned by the
        store from now on) for `tokens`. A stored sequence that `tokens`
        extends is replaced; one that already holds all of `tokens` is only
        marked recent. False when it was not kept (bigger than the budget)."""
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if not tokens or nbytes > self.budget:
            return False
        array = np.asarray(tokens, dtype=np.int64)
        evicted = 0
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.partition != partition:
                    continue
                length = common_prefix(entry.tokens, array)
                if length == len(array):              # already held (or more)
                    self._entries.move_to_end(key)
                    return True
                if length == len(entry.tokens):       # superseded by the longer sequence
                    self._drop(key)
            entry = Entry(partition, array, kv, nbytes)
            self._entries[id(entry)] = entry
            self.bytes += nbytes
            while self.bytes > self.budget:
                self._drop(next(iter(self._entries)))
                evicted += 1
            self.evictions += evicted
        if evicted:
            metrics.observe_prefix_evictions(self.model_id, evicted)
        return True

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"prefix_cache_bytes": self.bytes, "prefix_cache_entries": len(self._entries)}


def budget_bytes(config) -> int:
    """LLMHOST_PREFIX_CACHE_MB in bytes (0: no prefix cache)."""
    return max(0, int(float(config.PREFIX_CACHE_MB) * 2 ** 20))
