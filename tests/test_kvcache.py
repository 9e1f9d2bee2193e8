"""GrowingLayer (engine/kvcache.py) holds the same keys and values as
transformers' DynamicLayer, step after step, without copying the cache every
step; the scheduler's greedy-equality tests (test_engine.py) cover it inside
a real batch."""
import torch
from transformers.cache_utils import DynamicLayer

from llmhost.engine.kvcache import GrowingLayer, growing_cache


def _states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 2, length, 4, generator=g),
            torch.randn(batch, 2, length, 4, generator=g))


def test_same_states_as_dynamic_layer_and_no_copy_within_room():
    plain, growing = DynamicLayer(), GrowingLayer(room=8)
    for step in range(20):
        k, v = _states(3, 5 if step == 0 else 1, step)
        pk, pv = plain.update(k, v)
        gk, gv = growing.update(k, v)
        assert torch.equal(pk, gk) and torch.equal(pv, gv)
        if step == 1:
            buffer = growing.keys.data_ptr()
        if 1 <= step <= 8:   # 5 + 8 positions fit the first buffer
            assert growing.keys.data_ptr() == buffer
    assert growing.keys.data_ptr() != buffer    # grown once it was full
    assert growing.get_seq_length() == plain.get_seq_length() == 24


def test_a_fresh_layers_first_reserve_makes_its_buffers_directly(monkeypatch):
    """A fresh layer's first reserve makes its buffers with room (not through
    DynamicLayer.lazy_initialization's two empty tensors, replaced right after:
    half of a fresh cache's reserve); its keys and values are their empty views
    until the caller writes and advances, then what was written, and the next
    positions go into the same buffers."""
    def made_elsewhere(*args):
        raise AssertionError("lazy_initialization ran")

    monkeypatch.setattr(DynamicLayer, "lazy_initialization", made_elsewhere)
    layer = GrowingLayer(room=8)
    k, v = _states(3, 5, 0)
    assert layer.reserve(k, v) == 0 and layer.is_initialized and layer.get_seq_length() == 0
    assert layer.keys.shape == (3, 2, 0, 4) and layer._keys_buf.shape == (3, 2, 13, 4)
    layer._keys_buf[:, :, :5].copy_(k)
    layer._values_buf[:, :, :5].copy_(v)
    layer.advance(5)
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, v) and layer.get_seq_length() == 5
    k2, v2 = _states(3, 1, 1)
    keys, values = layer.update(k2, v2)
    assert torch.equal(keys, torch.cat((k, k2), 2)) and torch.equal(values, torch.cat((v, v2), 2))
    assert keys.data_ptr() == layer._keys_buf.data_ptr()   # within the room: no new buffer


def test_rows_replaced_from_outside_are_copied_into_a_new_buffer():
    """The scheduler drops rows and trims padding by assigning keys/values."""
    plain, growing = DynamicLayer(), GrowingLayer(room=8)
    for layer in (plain, growing):
        layer.update(*_states(3, 6, 0))
        keep = torch.tensor([0, 2])
        layer.keys, layer.values = layer.keys[keep, :, 2:], layer.values[keep, :, 2:]
    for step in range(3):
        k, v = _states(2, 1, step + 1)
        pk, pv = plain.update(k, v)
        gk, gv = growing.update(k, v)
        assert torch.equal(pk, gk) and torch.equal(pv, gv)
    assert growing.keys.shape == (2, 2, 7, 4)


def test_growing_cache_only_for_plain_dynamic_layers():
    from transformers import LlamaConfig, MistralConfig

    config = LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                         intermediate_size=32, vocab_size=64)
    assert all(type(layer) is GrowingLayer for layer in growing_cache(config).layers)
    sliding = MistralConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                            intermediate_size=32, vocab_size=64, sliding_window=4)
    assert not any(isinstance(layer, GrowingLayer) for layer in growing_cache(sliding).layers)


def test_growing_cache_is_transformers_cache_for_the_config_read_once(monkeypatch):
    """growing_cache reads a config's layers once (DynamicCache(config=...)
    is slow): its caches are what transformers makes for the config, every
    attribute but the layers, which are GrowingLayers, as many."""
    from transformers import DynamicCache, LlamaConfig

    from llmhost.engine import kvcache

    config = LlamaConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2,
                         intermediate_size=32, vocab_size=64)
    theirs = DynamicCache(config=config)
    made = []
    monkeypatch.setattr(kvcache, "DynamicCache", lambda *a, **k: made.append(k) or DynamicCache(*a, **k))
    caches = [growing_cache(config, room=8) for _ in range(3)]
    assert [bool(k.get("config")) for k in made] == [True, False, False, False], made
    for cache in caches:
        assert type(cache) is DynamicCache and len(cache.layers) == 3
        assert all(type(layer) is GrowingLayer and layer.room == 8 for layer in cache.layers)
        assert {k: v for k, v in vars(cache).items() if k != "layers"} == \
            {k: v for k, v in vars(theirs).items() if k != "layers"}
    assert caches[0].layers[0] is not caches[1].layers[0]


def test_views_are_made_when_read_and_a_replaced_one_leaves_the_other():
    """advance makes no views (a decode step on llamastep.c's path reads none); a read makes
    them; replacing keys alone keeps values the view they were; reset empties the layer."""
    plain, growing = DynamicLayer(), GrowingLayer(room=8)
    for layer in (plain, growing):
        layer.update(*_states(1, 4, 0))
    k, v = _states(1, 1, 1)
    length = growing.reserve(k, v)
    growing._keys_buf[:, :, length:length + 1].copy_(k)
    growing._values_buf[:, :, length:length + 1].copy_(v)
    growing.advance(1)
    assert growing._views == [None, None] and growing.get_seq_length() == 5
    pk, pv = plain.update(k, v)
    assert torch.equal(growing.keys, pk) and torch.equal(growing.values, pv)
    for layer in (plain, growing):
        layer.keys = layer.keys[:, :, 1:]
    assert growing.values.shape[-2] == 5 and torch.equal(growing.values, pv)
    for layer in (plain, growing):
        layer.values = layer.values[:, :, 1:]
    assert growing.get_seq_length() == plain.get_seq_length() == 4
    k, v = _states(1, 1, 2)
    pk, pv = plain.update(k, v)
    gk, gv = growing.update(k, v)
    assert torch.equal(pk, gk) and torch.equal(pv, gv)
    growing.reset()
    assert growing.keys is None and growing.values is None and growing.get_seq_length() == 0
    k, v = _states(1, 3, 3)
    assert torch.equal(growing.update(k, v)[0], k)
