"""Automatic prefix caching (issue 19): the KV cache of recent prompts of one
model, so that a request starting with tokens the model already read (an
agent loop resending its conversation, a shared system prompt) prefills only
the rest. Whole prefill chunks of prompts, not generated tokens, or, where a
model's rows are computed alone, any tokens: the scheduler says why
(``Scheduler._fill_step``, ``Scheduler.exact_rows``).

A store of whole sequences, not hashed blocks or a radix tree. vLLM hashes
fixed-size blocks because its KV lives in a paged GPU pool shared by
thousands of sequences; SGLang's radix tree shares nodes between them. Here a
model's KV is a transformers ``DynamicCache`` of plain per-row tensors:
reusing a prefix is one slice per layer, and nothing about the engine's cache
layout has to change. What a tree would add, sharing one copy of a common
prefix between sequences, is won for the case that matters (an agent loop) by
superseding: a sequence that extends a stored one replaces it, so a ten-turn
loop holds one entry, not ten. Finding the longest common prefix needs no
tree either: each partition keeps its sequences in sorted order (their tokens
as big-endian bytes, ``_key``), and of all of them the two beside a prompt's
place in that order share the longest prefix with it (``_beside``). Many
short chats fill the default 512 MiB with hundreds of sequences (SmolLM2: ~1
MiB for a 46-token prompt); comparing a prompt with each of them took 4.6 ms
of every request at 450 (thirty-third session, docs/prefix-caching.md).

Entries are partitioned (``partition``: a hash of the request's
``cache_salt`` and, with LLMHOST_PREFIX_CACHE_PER_KEY, of its API key): a
lookup only sees its own partition. One store per model, so a prefix never
crosses models. Least-recently-used entries go first when the budget is
reached; everything goes when the model is unloaded (``clear``).
"""
from __future__ import annotations

import bisect
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
    key: bytes                               # _key(tokens): its place in the partition's order


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


def _key(tokens: np.ndarray) -> bytes:
    """`tokens` as bytes that sort as the token sequences do (each token 4
    bytes, big-endian): lexicographic order, a prefix before what extends it.
    Token ids are a vocabulary's (the request checks a prompt's, the sampler
    draws the rest), far below 2 ** 32; a lookup's lengths are counted on the
    tokens themselves (common_prefix), the keys only choose whom to compare."""
    return tokens.astype(">u4").tobytes()


class PrefixStore:
    """Recent sequences of one model, within `budget` bytes. Used by the
    model's scheduler thread; `stats` may be read from any thread."""

    def __init__(self, model_id: str, budget: int) -> None:
        self.model_id = model_id
        self.budget = max(0, int(budget))
        self._entries: OrderedDict[int, Entry] = OrderedDict()   # least recently used first
        # per partition: its entries' keys in sorted order, and the entry of each key (no
        # stored sequence is a prefix of another: insert supersedes or keeps the longer one)
        self._sorted: dict[str, list[bytes]] = {}
        self._keyed: dict[tuple[str, bytes], Entry] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.tokens_reused = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _beside(self, partition: str, key: bytes) -> tuple[list[bytes], int]:
        """The partition's sorted keys and where `key` goes among them: the
        stored sequences sharing the longest prefix with it are at i - 1 and i
        (sorted sequences between one and `key` share at least that prefix)."""
        keys = self._sorted.get(partition, [])
        return keys, bisect.bisect_left(keys, key)

    def _nearest(self, partition: str, tokens: np.ndarray) -> list[tuple[int, Entry]]:
        """(common prefix length, entry) of the two stored sequences beside `tokens`."""
        keys, i = self._beside(partition, _key(tokens))
        return [(common_prefix(entry.tokens, tokens), entry)
                for entry in (self._keyed[partition, k] for k in keys[max(0, i - 1):i + 1])]

    def lookup(self, partition: str, prompt: list[int], block: int = 1) -> Hit | None:
        """The stored sequence sharing the longest prefix with `prompt`, at most
        all of it but its last token (whose logits the request needs), in
        whole `block`s (the scheduler's prefill chunks: see ``Scheduler``)."""
        tokens = np.asarray(prompt[:-1], dtype=np.int64)
        with self._lock:
            length, entry = max(self._nearest(partition, tokens), key=lambda found: found[0],
                                default=(0, None))
            length = length // block * block
            if not length:
                return None
            self._entries.move_to_end(id(entry))
            self.hits += 1
            self.tokens_reused += length
        metrics.observe_prefix_hit(self.model_id, length)
        return Hit(entry, length)

    def match(self, partition: str, prompt: list[int]) -> int:
        """How many of `prompt`'s tokens (all but its last) a lookup would
        reuse, without counting it as a hit."""
        tokens = np.asarray(prompt[:-1], dtype=np.int64)
        with self._lock:
            return max((length for length, _ in self._nearest(partition, tokens)), default=0)

    def holds(self, partition: str, tokens: list[int]) -> bool:
        """Whether a stored sequence already holds all of `tokens` (then
        there is nothing to copy): the first one sorted at or after them
        starts with them, if any does."""
        key = _key(np.asarray(tokens, dtype=np.int64))
        with self._lock:
            keys, i = self._beside(partition, key)
            return i < len(keys) and keys[i].startswith(key)

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
        key = _key(array)
        evicted = 0
        with self._lock:
            keys, i = self._beside(partition, key)
            if i < len(keys) and keys[i].startswith(key):    # already held (or more)
                self._entries.move_to_end(id(self._keyed[partition, keys[i]]))
                return True
            while i and key.startswith(keys[i - 1]):        # superseded by the longer sequence
                self._drop(id(self._keyed[partition, keys[i - 1]]))
                i -= 1
            entry = Entry(partition, array, kv, nbytes, key)
            self._entries[id(entry)] = entry
            self._sorted.setdefault(partition, []).insert(i, key)
            self._keyed[partition, key] = entry
            self.bytes += nbytes
            while self.bytes > self.budget:
                self._drop(next(iter(self._entries)))
                evicted += 1
            self.evictions += evicted
        if evicted:
            metrics.observe_prefix_evictions(self.model_id, evicted)
        return True

    def _drop(self, ident: int) -> None:
        entry = self._entries.pop(ident)
        self.bytes -= entry.nbytes
        keys = self._sorted[entry.partition]
        del keys[bisect.bisect_left(keys, entry.key)]
        del self._keyed[entry.partition, entry.key]
        if not keys:
            del self._sorted[entry.partition]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._sorted.clear()
            self._keyed.clear()
            self.bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"prefix_cache_bytes": self.bytes, "prefix_cache_entries": len(self._entries)}


def budget_bytes(config) -> int:
    """LLMHOST_PREFIX_CACHE_MB in bytes (0: no prefix cache)."""
    return max(0, int(float(config.PREFIX_CACHE_MB) * 2 ** 20))
