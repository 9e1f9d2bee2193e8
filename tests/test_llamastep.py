"""engine/llamastep.py: the scheduler's forward for Llama models computes
exactly what transformers' forward computes (bit for bit, with transformers'
attention: the prefix cache's whole-chunk reuse depends on it), and
quantize.Q4Group's one kernel call exactly what its layers compute alone."""
from __future__ import annotations

import pytest
import torch

from llmhost.config import TestConfig
from llmhost.engine.kvcache import growing_cache
from llmhost.engine.llamastep import LlamaStep
from llmhost.engine.scheduler import Scheduler
from llmhost.models.loading import LoadSpec, load


def _hf(model, ids, mask, positions, cache) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                 use_cache=True, logits_to_keep=1).logits


@torch.inference_mode()
def _run(model, forward) -> list[torch.Tensor]:
    """Logits of what the scheduler does: two left-padded prompts prefilled
    together, two decode steps; a long prompt in two chunks (the second
    continuing the first's cache), then a decode step."""
    out = []
    ids = torch.tensor([[0, 0, 0, 5, 9, 13, 2], [4, 8, 15, 16, 23, 42, 7]])
    mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = growing_cache(model.config)
    out.append(forward(model, ids, mask, positions, cache))
    for step in range(2):
        mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
        positions = positions[:, -1:] + 1
        out.append(forward(model, torch.tensor([[11 + step], [3]]), mask, positions, cache))
    long = torch.arange(100, 140).unsqueeze(0)
    cache = growing_cache(model.config)
    for begin, end in ((0, 24), (24, 40)):
        out.append(forward(model, long[:, begin:end], torch.ones((1, end), dtype=torch.long),
                           torch.arange(begin, end).unsqueeze(0), cache))
    out.append(forward(model, torch.tensor([[6]]), torch.ones((1, 41), dtype=torch.long),
                       torch.tensor([[40]]), cache))
    return out


def _same(model) -> None:
    step = LlamaStep.for_model(model)
    assert step is not None
    # transformers' attention in every forward (llmhost's, which decode steps and rows_alone
    # models run, is tests/test_attention.py's)
    step.own_attention = step.rows_alone = False
    ours = _run(model, lambda m, *args: step(*args))
    theirs = _run(model, _hf)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llama_step_equals_transformers_bit_for_bit(tiny_models, dtype):
    loaded = load(LoadSpec(model=tiny_models["llama"], dtype=dtype), TestConfig())
    _same(loaded.model)
    scheduler = Scheduler("tiny", loaded, TestConfig())   # not started: what it would run
    try:
        assert isinstance(scheduler.step, LlamaStep)
    finally:
        scheduler.close("test over")


@pytest.mark.slow   # SmolLM2 int4 (the session's in-process load)
def test_llama_step_equals_transformers_on_smollm2_int4(smollm2_int4):
    """int4 with llmhost's kernel: q/k/v and gate/up grouped at load, one call each."""
    model = smollm2_int4.model
    if smollm2_int4.kernel == "int4-llmhost":
        layer = model.model.layers[0]
        assert layer.self_attn.q4_group.sizes == [576, 192, 192]
        assert len(layer.mlp.q4_group.sizes) == 2
    _same(model)


@pytest.mark.slow   # SmolLM2 int4, loaded in bfloat16 and in float32
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_int4_layers_run_in_one_native_call(smollm2_gguf, dtype):
    """llamastep.c runs an int4 model's decoder layers (llmhost's kernel): two
    layers compute what LlamaStep's torch loop computes, the last one past its
    keys and values for each sequence's last row only (bfloat16: the same bits;
    float32: within the noise of the kernel's 8-bit activations, which a 1e-7
    change of the input gives the torch loop too, as the norms' sums run in
    another order), the greedy tokens of a chat are the torch loop's, and a
    cache of transformers' own layers keeps the torch loop."""
    from transformers import DynamicCache

    from llmhost.engine.llamastep import _Native

    loaded = load(LoadSpec(model=smollm2_gguf, quantization="int4", dtype=dtype), TestConfig())
    if loaded.kernel != "int4-llmhost":
        pytest.skip("llmhost's int4 kernel does not run here")
    model = loaded.model
    step = LlamaStep.for_model(model)
    assert step.rows_alone and step.native is not None
    ids = torch.randint(100, 40000, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0                                   # a left-padded row
    with torch.inference_mode():
        h = step.embed(ids)
        cos, sin = step.rotary(h, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        sin = torch.cat((-sin[..., :32], sin[..., 32:]), -1)   # as LlamaStep passes it
        caches = growing_cache(model.config), growing_cache(model.config)
        first = step._layer(step.layers[0], h, cos.unsqueeze(1), sin.unsqueeze(1), caches[0], mask, True)
        second = step._layer(step.layers[1], first, cos.unsqueeze(1), sin.unsqueeze(1), caches[0], mask, True)
        got = _Native.build(model, step.layers[:2])(h.clone(), cos, sin, mask, caches[1])
    # the last layer takes each sequence's last row alone on from its keys and values: the
    # other rows keep the first layer's states
    want = torch.cat([first[:, :-1], second[:, -1:]], 1)
    assert got.dtype == want.dtype == getattr(torch, dtype) and got.shape == want.shape
    pairs = [(got, want)] + [(getattr(c.layers[i], part) for c in caches[::-1])
                             for i in range(2) for part in ("keys", "values")]
    if dtype == "bfloat16":
        assert all(torch.equal(a, b) for a, b in pairs)
    else:
        for a, b in pairs:
            assert 0 < ((a - b).norm() / b.norm()).item() < 0.02

    def greedy(native) -> tuple[list[int], list[float]]:
        """12 greedy tokens, and each step's gap between its top two logits (the cache's
        buffers grown every other step: the native call's layers point at the new ones)"""
        step.native, cache, tokens, gaps = native, growing_cache(model.config, room=2), [], []
        chat = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 30, 2, 198, 1, 4093, 198]])
        with torch.inference_mode():
            for _ in range(12):
                begin = cache.get_seq_length()
                new = chat[:, begin:]
                logits = step(new, torch.ones(1, chat.shape[1], dtype=torch.long),
                              torch.arange(begin, chat.shape[1])[None], cache, bool(tokens))
                top = logits[0, -1].float().topk(2).values
                tokens.append(int(logits[0, -1].argmax()))   # the first of equal logits, as generate takes
                gaps.append(float(top[0] - top[1]))
                chat = torch.cat([chat, torch.tensor([[tokens[-1]]])], 1)
        return tokens, gaps

    native = step.native
    (ours, our_gaps), (theirs, their_gaps) = greedy(native), greedy(None)
    if dtype == "bfloat16":
        assert ours == theirs
    else:   # float32: the noise above may tip a near tie (which token it reaches depends on the CPU's
        # vector width: 8-lane attention tipped the 3rd token at a gap of 0.05), never a clear choice
        split = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        assert split == len(ours) or min(our_gaps[split], their_gaps[split]) < 0.125, (ours, theirs)
    calls = []
    step.native, lib = native, native.lib
    native.lib = type("Counted", (), {"llama_layers": lambda self, *a: calls.append(1) or lib.llama_layers(*a)})()
    with torch.inference_mode():
        for cache in (DynamicCache(config=model.config), growing_cache(model.config)):
            step(ids[:1], torch.ones(1, 24, dtype=torch.long), torch.arange(24)[None], cache)
    assert calls == [1]


def test_other_models_keep_transformers_forward(tiny_models):
    gpt2 = load(LoadSpec(model=tiny_models["gpt2"]), TestConfig())
    assert LlamaStep.for_model(gpt2.model) is None
    scheduler = Scheduler("tiny", gpt2, TestConfig())
    try:
        assert scheduler.step is None
    finally:
        scheduler.close("test over")
    llama = load(LoadSpec(model=tiny_models["llama"]), TestConfig()).model
    norm = llama.model.layers[1].post_attention_layernorm
    norm.forward = lambda h: h   # a kernel swapped into a module's forward: not ours to mirror
    assert LlamaStep.for_model(llama) is None


def test_q4_group_computes_what_its_layers_compute():
    """One kernel call for q/k/v equals the three layers, for a few rows and
    for many; the layers' blocks become views of the group's (no
    second copy: only the Q4_0 layer among Q4_1 ones gains an m plane), and
    each layer alone still gives its own output."""
    import numpy as np
    from gguf import GGMLQuantizationType, quantize

    from llmhost.models import q4kernel
    from llmhost.models.quantize import Q4Group, int4_from_gguf, model_bytes

    if not q4kernel.available()[0]:
        pytest.skip("llmhost's int4 kernel is unavailable here")
    rng = np.random.default_rng(0)
    layers = []
    for rows, kind in ((96, "Q4_1"), (32, "Q4_0"), (64, "Q4_1")):
        blocks = quantize(rng.standard_normal((rows, 160)).astype(np.float32), GGMLQuantizationType[kind])
        layers.append(int4_from_gguf(kind, blocks, np.arange(rows), torch.float32))
    holder = torch.nn.ModuleList(layers)
    before_bytes = model_bytes(holder)
    m_plane = layers[1].dm.nbytes   # the Q4_0 layer keeps d alone; among Q4_1 layers it gets its m
    xs = (torch.randn(1, 3, 160), torch.randn(1, 300, 160))
    alone = [[layer(x) for layer in layers] for x in xs]
    group = Q4Group(layers)
    assert model_bytes(holder) == before_bytes + m_plane
    for layer in layers:
        assert group.qs.data_ptr() <= layer.qs.data_ptr() < group.qs.data_ptr() + group.qs.nbytes
    for x, expected in zip(xs, alone):
        for got, want, layer in zip(group(x), expected, layers):
            assert torch.equal(got, want) and torch.equal(layer(x), want)
