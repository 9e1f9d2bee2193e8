"""engine/attention.py: llmhost's CPU attention computes softmax(q k^T /
sqrt(d)) v as transformers' attention does, within float32's (or bfloat16's)
rounding, for lone rows, prompts, left-padded batches, grouped-query heads,
keys split over several spans and cache views with spare room, each row with
the bits it has alone; the Llama step's decode steps keep their greedy
answers on it."""
from __future__ import annotations

import pytest
import torch

from llmhost.config import TestConfig
from llmhost.engine import attention, native
from llmhost.engine.kvcache import growing_cache
from llmhost.engine.llamastep import LlamaStep
from llmhost.engine.native import COMPILE
from llmhost.models.loading import LoadSpec, load

pytestmark = pytest.mark.skipif(not attention.supports(torch.float32, torch.device("cpu"), 64, 9, 3),
                                reason="llmhost's attention kernel does not run here")


def _reference(q, k, v, mask, scale):
    """float64 attention per row: the keys up to the row's place, where the mask is set."""
    batch, heads, length, dim = q.shape
    keys, group = k.shape[2], heads // k.shape[1]
    out = torch.zeros(batch, length, heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                seen = torch.arange(keys) <= keys - length + i
                if mask is not None:
                    seen &= mask[b].bool()
                kk, vv = k[b, h // group][seen].double(), v[b, h // group][seen].double()
                weights = torch.softmax(kk @ q[b, h, i].double() * scale, dim=0)
                out[b, i, h] = weights @ vv
    return out


@pytest.fixture(scope="module", params=["native", "avx512", "avx2"])
def lib(request):
    """This process's build (AVX-512's 16 lanes where the CPU has them, and
    bfloat16 on AMX tiles where it has those), the AVX-512 build without AMX
    (where the CPU has AVX-512) and the AVX2 build, which CPUs without AVX-512
    run."""
    if request.param == "native":
        return attention._library()[0]
    flags = native.cpu_flags()
    if request.param == "avx512" and "avx512f" not in flags:
        pytest.skip("the CPU lacks avx512f")
    built, why = attention.build(attention.compile_flags(flags, tiles=False) if request.param == "avx512"
                                 else COMPILE)
    if built is None:
        pytest.skip(why)
    return built


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads,kv_heads,dim,keys,length", [
    (9, 3, 64, 1, 1), (9, 3, 64, 700, 1), (4, 2, 16, 1300, 1), (8, 8, 32, 37, 3), (2, 1, 128, 520, 2)])
def test_attend_matches_float64(lib, dtype, tolerance, heads, kv_heads, dim, keys, length):
    torch.manual_seed(keys + heads)
    batch, room = 2, 9
    q = torch.randn(batch, length, heads, dim).to(dtype).transpose(1, 2)   # the step's layout
    k = torch.randn(batch, kv_heads, keys + room, dim).to(dtype)[:, :, :keys]   # a cache view
    v = torch.randn(batch, kv_heads, keys + room, dim).to(dtype)[:, :, :keys]
    mask = torch.ones(batch, keys, dtype=torch.long)
    mask[1, :keys // 3] = 0                                   # the second row left-padded
    for m in (None, mask):
        got = attention.attend(q, k, v, m, dim ** -0.5, lib)
        assert got.shape == (batch, length, heads, dim) and got.dtype == dtype
        want = _reference(q, k, v, m, dim ** -0.5)
        assert (got.double() - want).abs().max() <= tolerance * max(1.0, want.abs().max())


def test_a_padded_row_reads_only_its_own_keys(lib):
    """Left padding is skipped, not weighted: garbage in the padded keys changes nothing."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 600, 16), torch.randn(1, 2, 600, 16)
    mask = torch.ones(1, 600, dtype=torch.long)
    mask[0, :20] = 0
    first = attention.attend(q, k, v, mask, 0.25, lib)
    k[:, :, :20], v[:, :, :20] = 1e4, -1e4
    assert torch.equal(attention.attend(q, k, v, mask, 0.25, lib), first)
    alone = attention.attend(q, k[:, :, 20:], v[:, :, 20:], None, 0.25, lib)
    assert torch.equal(alone, first)   # a row's arithmetic is the same with and without its padding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding", [0, 50])
@pytest.mark.parametrize("heads,kv_heads,dim,keys,length", [(9, 3, 64, 700, 530), (8, 2, 128, 600, 45)])
def test_each_row_of_a_prompt_has_the_bits_it_has_alone(lib, dtype, padding, heads, kv_heads, dim, keys,
                                                        length):
    """A prompt over keys of its own and before it (rows in blocks on AMX tiles;
    SmolLM2's shape with the last rows' keys in two spans, and 128 dims in two
    passes), in a batch whose second sequence is left-padded: every row equals
    the same row computed alone on its own keys."""
    torch.manual_seed(3)
    q = torch.randn(2, length, heads, dim).to(dtype).transpose(1, 2)
    k, v = torch.randn(2, kv_heads, keys, dim).to(dtype), torch.randn(2, kv_heads, keys, dim).to(dtype)
    mask = torch.ones(2, keys, dtype=torch.long)
    mask[1, :padding] = 0
    whole = attention.attend(q, k, v, mask if padding else None, 0.125, lib)
    for b in range(2):
        for i in range(length):
            end = keys - length + i + 1
            alone = attention.attend(q[b:b + 1, :, i:i + 1], k[b:b + 1, :, padding * b:end],
                                     v[b:b + 1, :, padding * b:end], None, 0.125, lib)
            assert torch.equal(alone[0, 0], whole[b, i]), (b, i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 2, 64), (4, 4, 32), (8, 1, 128), (4, 2, 48)])
@pytest.mark.parametrize("length,keys", [(16, 16), (17, 40), (31, 600), (33, 1100)])
def test_a_prompts_rows_in_blocks_keep_each_rows_bits(lib, dtype, heads, kv_heads, dim, length, keys):
    """Rows of 16 or more are computed 16 at a time (a row a lane on
    AVX-512): at a block's edges (16, 17, 31, 33 rows), with keys in up to
    three spans, in a mask with holes, for each shape of heads the kernel has
    a path for, in float32 and in bfloat16 (whose scores are pairs of
    products where the CPU has AVX512-BF16), every row has the bits it has
    computed alone."""
    torch.manual_seed(length + keys + dim)
    q = torch.randn(2, length, heads, dim).to(dtype).transpose(1, 2)
    k, v = torch.randn(2, kv_heads, keys, dim).to(dtype), torch.randn(2, kv_heads, keys, dim).to(dtype)
    mask = (torch.rand(2, keys) > 0.2).long()
    mask[:, -length:] = 1   # the prompt's own tokens
    whole = attention.attend(q, k, v, mask, dim ** -0.5, lib)
    for i in range(length):
        end = keys - length + i + 1
        alone = attention.attend(q[:, :, i:i + 1], k[:, :, :end], v[:, :, :end], mask[:, :end], dim ** -0.5, lib)
        assert torch.equal(alone[:, 0], whole[:, i]), i


def test_amx_tiles_keep_the_vector_paths_bits_but_for_rounding_order():
    """On a CPU with AMX, bfloat16 attention runs on the tiles with each weight
    as two bfloat16s: its outputs are the AVX-512 build's but for a few last
    bits (rounding the weights to one bfloat16, as torch does, changes a
    fifth or more of them, and greedy answers with them)."""
    flags = native.cpu_flags()
    if attention.AMX[0] not in attention.compile_flags(flags) or not attention._library()[0].attention_amx():
        pytest.skip("the CPU has no AMX bfloat16 tiles")
    vectors, why = attention.build(attention.compile_flags(flags, tiles=False))
    assert vectors is not None, why
    torch.manual_seed(5)
    q = torch.randn(2, 9, 300, 64).bfloat16()
    k, v = torch.randn(2, 3, 300, 64).bfloat16(), torch.randn(2, 3, 300, 64).bfloat16()
    tiles, vector = (attention.attend(q, k, v, None, 0.125, lib) for lib in (attention._library()[0], vectors))
    differ = (tiles != vector).float().mean().item()
    assert 0 < differ < 0.01, differ   # the tiles ran (other bits), the weights kept 16 bits


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llama_decode_steps_use_it_with_the_same_greedy_tokens(tiny_models, dtype):
    """The tiny Llama: prefill (transformers' attention, as before) then twenty
    decode steps on llmhost's attention against the same steps on
    transformers': logits within rounding, the same greedy tokens."""
    model = load(LoadSpec(model=tiny_models["llama"], dtype=dtype), TestConfig()).model
    step = LlamaStep.for_model(model)
    assert step.own_attention

    @torch.inference_mode()
    def greedy(decode: bool):
        ids = torch.tensor([[0, 0, 5, 9, 13, 2], [4, 8, 15, 16, 23, 42]])
        mask = (torch.arange(6) >= torch.tensor([[2], [0]])).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = growing_cache(model.config)
        logits = [step(ids, mask, positions, cache)]
        for _ in range(20):
            ids = logits[-1].argmax(-1)
            mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
            positions = positions[:, -1:] + 1
            logits.append(step(ids, mask, positions, cache, decode))
        return torch.cat(logits, dim=1)

    ours, theirs = greedy(True), greedy(False)
    assert torch.equal(ours[:, 0], theirs[:, 0])   # the prefill is transformers' own
    assert not torch.equal(ours, theirs) or dtype == "bfloat16"   # float32: another order of sums
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert (ours.float() - theirs.float()).abs().max() < (2e-4 if dtype == "float32" else 0.1)


@pytest.mark.slow   # SmolLM2 int4 (the session's in-process load)
def test_smollm2_int4_keys_do_not_depend_on_how_they_were_computed(smollm2_int4):
    """SmolLM2 int4 on llmhost's kernel (rows_alone): a 300-token sequence's
    keys, values and last logits are the same bits whether it is read in one
    forward, in chunks of any size, or prefilled beside a left-padded row and
    finished by decode steps in that batch (what the prefix cache's any-prefix
    reuse of prompts and generated tokens rests on)."""
    model = smollm2_int4.model
    step = LlamaStep.for_model(model)
    if not step.rows_alone:
        pytest.skip("llmhost's int4 kernel does not run here")
    seq = torch.randint(100, 40000, (1, 300), generator=torch.Generator().manual_seed(1))

    @torch.inference_mode()
    def chunks(bounds):
        cache = growing_cache(model.config)
        for begin, end in zip(bounds, bounds[1:]):
            logits = step(seq[:, begin:end], torch.ones(1, end, dtype=torch.long),
                          torch.arange(begin, end)[None], cache)
        return logits[0], [(layer.keys[0], layer.values[0]) for layer in cache.layers]

    @torch.inference_mode()
    def batched():
        other = torch.randint(100, 40000, (1, 250), generator=torch.Generator().manual_seed(2))
        ids = torch.cat([seq[:, :290], torch.cat([torch.zeros(1, 40, dtype=torch.long), other], 1)])
        mask = torch.ones(2, 290, dtype=torch.long)
        mask[1, :40] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = growing_cache(model.config)
        step(ids, mask, positions, cache)
        for t in range(290, 300):
            mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
            positions = positions[:, -1:] + 1
            logits = step(torch.tensor([[int(seq[0, t])], [7]]), mask, positions, cache, True)
        return logits[0], [(layer.keys[0], layer.values[0]) for layer in cache.layers]

    want_logits, want_kv = chunks([0, 128, 256, 300])
    for got_logits, got_kv in (chunks([0, 300]), chunks([0, 137, 265, 299, 300]), batched()):
        assert torch.equal(got_logits, want_logits)
        for (k, v), (wk, wv) in zip(got_kv, want_kv):
            assert torch.equal(k[:, :300], wk[:, :300]) and torch.equal(v[:, :300], wv[:, :300])


CPU_FLAGS_PROBE = """
from llmhost.engine import native
from llmhost.models import q4kernel, quantize
print(sorted(native.cpu_flags()), native.missing_flags(), quantize.auto_cpu_dtype(),
      q4kernel.compile_flags(native.cpu_flags())[-1], q4kernel.available()[0])
"""


@pytest.mark.parametrize("only", ["avx2 fma f16c", "avx2,fma"])
def test_cpu_flags_setting_plans_for_fewer_flags(only):
    """LLMHOST_CPU_FLAGS: llmhost plans as on a CPU with only those flags (of
    this CPU's): float32 for dtype auto, no VNNI build, and no kernel at all
    without F16C."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", CPU_FLAGS_PROBE], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "LLMHOST_CPU_FLAGS": only})
    assert out.returncode == 0, out.stderr[-2000:]
    named = set(only.replace(",", " ").split())
    assert out.stdout.split("]")[0] == str(sorted(named))[:-1], out.stdout
    assert "torch.float32" in out.stdout and "vnni" not in out.stdout, out.stdout
    if "f16c" in named:
        assert out.stdout.split()[-2:] == ["-fPIC", "True"], out.stdout
    else:
        assert "['f16c']" in out.stdout and out.stdout.split()[-1] == "False", out.stdout
