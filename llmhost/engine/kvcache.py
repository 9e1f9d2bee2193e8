"""A KV-cache layer that grows into spare room instead of being copied every
step.

transformers' ``DynamicLayer`` appends a decode step's key and value with
``torch.cat``, which copies the whole cache of every layer at every step: the
copy grows with the context and the batch (the profile in docs/performance.md,
"Where a decode step's time goes"). ``GrowingLayer`` keeps each tensor in a
buffer with ``ROOM`` free positions after the last one and writes a step into
that room; ``keys``/``values`` are views of the filled part, so the attention
reads exactly the same numbers (greedy output is unchanged, the tests check
it). transformers' ``StaticCache`` preallocates too, but for the whole context
of every row and with one position shared by the batch, which does not fit a
batch whose rows join, leave and are trimmed between steps.

The scheduler's batch bookkeeping (merging a prefill into the batch, dropping
finished rows, trimming padding) replaces ``keys``/``values`` with new tensors;
the next ``update`` sees that they are no longer views of its buffer and copies
them into a fresh one (once, not every step).
"""
from __future__ import annotations

import weakref

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Free positions kept after the last one: one copy of the cache per ROOM steps
# instead of one per step. 64 positions of spare room per row and layer is a
# small share of a context (a few KiB to a few hundred KiB per row and layer).
ROOM = 64


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are views of larger buffers."""

    def __init__(self, room: int = ROOM, **kwargs) -> None:
        self._length: int | None = None   # positions filled where keys/values are the buffers' views
        self._views: list = [None, None]  # those views, made when read
        super().__init__(**kwargs)
        self.room = room
        self._keys_buf: torch.Tensor | None = None
        self._values_buf: torch.Tensor | None = None

    # keys and values: views of the buffers' filled part after an advance, made when they are
    # read (a decode step advances every layer, and on llamastep.c's path reads none of them:
    # two views a layer took ~1.7 us, 50 us of a SmolLM2 decode step), or what was set
    def _view(self, i: int) -> torch.Tensor | None:
        if self._views[i] is None and self._length is not None:
            self._views[i] = (self._keys_buf, self._values_buf)[i].narrow(2, 0, self._length)
        return self._views[i]

    def _set(self, i: int, value: torch.Tensor | None) -> None:
        if self._length is not None:   # the other one stays the view it is
            self._view(1 - i)
            self._length = None
        self._views[i] = value

    keys = property(lambda self: self._view(0), lambda self, value: self._set(0, value))
    values = property(lambda self: self._view(1), lambda self, value: self._set(1, value))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.reserve(key_states, value_states)
        new = key_states.shape[-2]
        self._keys_buf[:, :, length:length + new].copy_(key_states)
        self._values_buf[:, :, length:length + new].copy_(value_states)
        self.advance(new)
        return self.keys, self.values

    def reserve(self, key_states: torch.Tensor, value_states: torch.Tensor) -> int:
        """Room in the buffers for `key_states`' positions (their shape and dtype:
        [rows, heads, new, dim]) after the filled ones, whose count it returns; the
        caller writes them there (``update``, or engine/llamastep.c) and calls
        ``advance``."""
        new = key_states.shape[-2]
        if self._length is not None and self._length + new <= self._keys_buf.shape[-2]:
            return self._length   # the views the last advance made, with room: a decode step's case
        if not self.is_initialized:
            # DynamicLayer.lazy_initialization's, the keys and values empty views of the new
            # buffers instead of its two torch.tensor([]) and a second pass through _in_room
            # and _rebuffer: a fresh cache's reserve 218 -> 80 us on SmolLM2's 30 layers, in
            # every request's first forward (thirty-fourth session)
            self.device, self.is_initialized = key_states.device, True
            self._keys_buf = _rebuffer(None, key_states, new + self.room)
            self._values_buf = _rebuffer(None, value_states, new + self.room)
            self._length, self._views = 0, [None, None]
            return 0
        if not (_in_room(self.keys, self._keys_buf, key_states, new)
                and _in_room(self.values, self._values_buf, value_states, new)):
            self._keys_buf = _rebuffer(self.keys, key_states, new + self.room)
            self._values_buf = _rebuffer(self.values, value_states, new + self.room)
        return self.get_seq_length()

    def advance(self, new: int) -> None:
        """The `new` positions written after ``reserve`` join the keys and values."""
        length = (self._length if self._length is not None else self.get_seq_length()) + new
        self._length, self._views = length, [None, None]

    def get_seq_length(self) -> int:
        return self._length if self._length is not None else super().get_seq_length()

    def reset(self) -> None:
        self._length, self._views = None, [None, None]
        self._keys_buf = self._values_buf = None
        super().reset()


def _in_room(current: torch.Tensor, buf: torch.Tensor | None, states: torch.Tensor,
             new: int) -> bool:
    """`current` is still the view of `buf` this layer made, and `new` more
    positions of `states`' rows fit after it."""
    return (buf is not None and current.numel() > 0 and current.data_ptr() == buf.data_ptr()
            and current.stride() == buf.stride() and current.dtype == states.dtype
            and current.shape[:2] == states.shape[:2] == buf.shape[:2]
            and current.shape[-1] == buf.shape[-1]
            and current.shape[-2] + new <= buf.shape[-2])


def _rebuffer(current: torch.Tensor | None, states: torch.Tensor, extra: int) -> torch.Tensor:
    """A buffer holding `current` (empty or None before the first update) with
    `extra` positions free after it."""
    length = current.shape[-2] if current is not None and current.numel() else 0
    batch, heads, _, dim = states.shape
    buf = states.new_empty((batch, heads, length + extra, dim))
    if length:
        buf[:, :, :length].copy_(current)
    return buf


def growing_cache(config, room: int = ROOM) -> DynamicCache:
    """A ``DynamicCache`` for `config` whose layers are ``GrowingLayer``s with
    `room` free positions (a chunked prefill asks for its whole prompt, so its
    chunks are written without copies; ``set_room`` brings it back to ROOM).
    Only for models whose every layer is a plain ``DynamicLayer`` (the
    scheduler's batchable case); others keep transformers' own layers."""
    count = _plain_layers(config)
    if count is None:
        return DynamicCache(config=config)
    cache = DynamicCache()   # the layers DynamicCache(config=config) makes, as GrowingLayers
    cache.layers, cache.layer_class_to_replicate = [GrowingLayer(room) for _ in range(count)], None
    return cache


# id(config) -> (a weak reference to it, how many layers DynamicCache(config=config) makes, or
# None where they are not all plain DynamicLayers). DynamicCache(config=...) reads the layer
# types through the config's attribute hooks: 263 us a cache (SmolLM2), every request's; once
# per config here, a cache then 13 us (thirty-third session)
_LAYERS: dict[int, tuple[weakref.ref, int | None]] = {}


def _plain_layers(config) -> int | None:
    known = _LAYERS.get(id(config))
    if known is None or known[0]() is not config:
        layers = DynamicCache(config=config).layers
        count = len(layers) if all(type(layer) is DynamicLayer for layer in layers) else None
        known = _LAYERS[id(config)] = (weakref.ref(config, lambda _, key=id(config): _LAYERS.pop(key, None)),
                                       count)
    return known[1]


def set_room(cache: DynamicCache, room: int = ROOM) -> None:
    """Later rebuffers of `cache` keep `room` free positions."""
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            layer.room = room


def seeded_cache(config, layers: list[tuple[torch.Tensor, torch.Tensor]],
                 room: int = ROOM) -> DynamicCache:
    """A ``growing_cache`` already holding `layers` (per layer the keys and
    values [rows, heads, length, head_dim]): the prefix cache's reused
    positions, which the next forward continues from."""
    cache = growing_cache(config, room)
    for layer, (keys, values) in zip(cache.layers, layers):
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return cache
