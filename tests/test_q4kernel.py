"""models/q4kernel.c's AMX path (a prefill's Q4 products on the tiles of a CPU with
AMX) gives the bits of its other tiles: every row the same alone as batched, the
same as the library built without AMX, so rows_alone holds (the prefix cache's
any-prefix reuse rests on it). Runs where the CPU has AMX; the flag choice anywhere.
Its feature lanes (a packed Q4 weight: packs of 16 features with AVX-512 VNNI without
AMX, of 8 in the plain AVX2 build and with AVX-VNNI) hold the same promise, with the same
bits on every build; the AVX-512 ones run where the CPU has AVX-512 VNNI, the AVX-VNNI ones
there too (the same instruction EVEX-encoded) or where it has AVX-VNNI. So do the plain AVX2
build's tiles and lanes, built and run on any x86 CPU with AVX2."""
from __future__ import annotations

import pytest
import torch

from llmhost.engine import native
from llmhost.models import q4kernel

AMX_FLAGS = {"amx_tile", "amx_int8", "avx512_vnni", "avx512bw", "avx512vl"}


def _q4_weight(n: int, k: int, planes: int, generator: torch.Generator):
    """(qs, dm) of a random [n, k] Q4 weight in the file's layout: Q4_0 (planes 1) or Q4_1."""
    qs = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator)
    return qs, (torch.rand(planes, n, k // 32, generator=generator) * 0.02 - 0.005).half()


def test_amx_is_compiled_in_only_where_the_cpu_has_it():
    without = frozenset({"avx2", "fma", "f16c", "avx512_vnni", "avx512vl"})
    assert "-mamx-int8" not in q4kernel.compile_flags(without)
    assert "-mamx-int8" not in q4kernel.compile_flags(without | {"amx_tile"})
    flags = q4kernel.compile_flags(without | AMX_FLAGS)
    assert "-mamx-int8" in flags and "-mamx-tile" in flags and "-mavx512vnni" in flags


@pytest.mark.skipif(not AMX_FLAGS <= native.cpu_flags() or not q4kernel.available()[0],
                    reason="the CPU has no AMX (or LLMHOST_CPU_FLAGS leaves it out)")
def test_amx_products_are_the_bits_of_the_other_tiles():
    amx, why = q4kernel.build(q4kernel.compile_flags(native.cpu_flags()))
    assert amx is not None, why
    assert amx.q4_amx_enable() == 16    # the rows from which products run on the tiles
    other, why = q4kernel.build(q4kernel.compile_flags(native.cpu_flags() - AMX_FLAGS))
    assert other is not None, why
    assert other.q4_amx_enable() == 0
    generator = torch.Generator().manual_seed(0)
    # k: whole groups only (1536), a pair after them (576: SmolLM2), three (960), an odd block
    # (352, 800)
    for k in (1536, 576, 960, 352, 800):
        for planes in (1, 2):          # Q4_0 (d alone, m = -8 d) and Q4_1 (d and m)
            n = 33                     # two whole 16-feature tiles and one of a single feature
            qs, dm = _q4_weight(n, k, planes, generator)
            for dtype in (torch.float32, torch.bfloat16):
                x = (torch.randn(40, k, generator=generator) * 3).to(dtype)
                x[7] = 0                # a row of zeros: its scales are 0
                batched = q4kernel.matmul(x, qs, dm, lib=amx)        # 40 rows: the tiles
                assert torch.equal(batched, q4kernel.matmul(x, qs, dm, lib=other)), (k, planes, dtype)
                alone = torch.cat([q4kernel.matmul(x[i:i + 1], qs, dm, lib=amx) for i in range(40)])
                assert torch.equal(batched, alone), (k, planes, dtype)
                # 17 rows (a second row tile of one row) and exactly 16
                for rows in (17, 16):
                    assert torch.equal(q4kernel.matmul(x[:rows], qs, dm, lib=amx), batched[:rows])
                # and the float32 product it stands for, to the 8-bit activations' rounding
                want = torch.mm(q4kernel.requantized(x), q4kernel.dequantize(qs, dm).T)
                assert torch.allclose(batched.float(), want, rtol=0.02, atol=0.05 * want.abs().max().item())


LANES_FLAGS = {"avx512_vnni", "avx512bw", "avx512vl"}


def _lanes_or_skip() -> None:
    """In the test, not at collection: asking builds the kernel."""
    if not q4kernel.available()[0] or not q4kernel.lanes():
        pytest.skip("this process's kernel has no feature lanes (an AMX build, or no kernel)")


def _plain_build():
    """The plain AVX2 build of the kernel (no VNNI, no AVX-512), on any CPU the kernel runs on;
    the test is skipped where it does not."""
    if not q4kernel.available()[0]:
        pytest.skip("llmhost's int4 kernel is unavailable here")
    plain, why = q4kernel.build(q4kernel.COMPILE)
    assert plain is not None, why
    return plain


def test_feature_lanes_are_built_for_avx512_vnni_without_amx_and_plain_avx2():
    base = frozenset({"avx2", "fma", "f16c"})
    assert "-mavx512bw" in q4kernel.compile_flags(base | LANES_FLAGS)
    # no BW: an AVX-VNNI CPU's build (the same vpdpbusd on 256-bit vectors, EVEX-encoded)
    assert q4kernel.compile_flags(base | {"avx512_vnni", "avx512vl"}) == \
        q4kernel.COMPILE + ("-mavx512vnni", "-mavx512vl") != q4kernel.compile_flags(base | {"avx_vnni"})
    plain = _plain_build()
    assert plain.q4_lanes() == 8
    if LANES_FLAGS <= native.cpu_flags() and not AMX_FLAGS <= native.cpu_flags():
        assert q4kernel.lanes() == 16


def test_the_avx2_build_gives_each_row_its_bits_alone():
    """The plain AVX2 build (an AVX2-only CPU's tiles, 16 registers: 8-row whole tiles where k
    is narrow, else 4, no VNNI), which test_fast's kernel test does not run on an AVX-512 CPU:
    a row the same bits alone (one thread) as in calls of 2 to 150 rows on 1 and 2 threads,
    with feature counts that split unevenly into chunks (70, 45, 576: chunks bounded at even
    shares of them) and k of whole groups, a partial group and passes over k (4,640)."""
    plain = _plain_build()
    generator = torch.Generator().manual_seed(7)
    threads = torch.get_num_threads()
    try:
        for k, n in ((576, 70), (1536, 45), (4640, 11), (576, 576)):
            qs, dm = _q4_weight(n, k, 2, generator)
            x = torch.randn(150, k, generator=generator)
            torch.set_num_threads(1)
            alone = torch.cat([q4kernel.matmul(x[i:i + 1], qs, dm, lib=plain) for i in range(150)])
            exact = q4kernel.requantized(x).double() @ q4kernel.dequantize(qs, dm).double().T
            torch.testing.assert_close(alone.double(), exact, rtol=1e-5, atol=1e-4)
            for nt in (1, 2):
                torch.set_num_threads(nt)
                for m in (2, 5, 37, 150):
                    for start in (0, 150 - m):
                        batch = q4kernel.matmul(x[start:start + m], qs, dm, lib=plain)
                        assert torch.equal(batch, alone[start:start + m]), (k, n, nt, m, start)
    finally:
        torch.set_num_threads(threads)


def _avx_vnni_build():
    """The kernel as an AVX-VNNI CPU (AVX2 with vpdpbusd on 256-bit vectors, no AVX-512) builds
    it: with -mavxvnni where the CPU has AVX-VNNI, else, where it has AVX-512 VNNI, with the same
    instruction EVEX-encoded (compile_flags' AVX-512 VNNI without BW: -mavx512vnni -mavx512vl,
    the same integers and no AVX-512 lanes); skipped elsewhere."""
    have = native.cpu_flags()
    if not q4kernel.available()[0] or not ("avx_vnni" in have or {"avx512_vnni", "avx512vl"} <= have):
        pytest.skip("this CPU runs neither AVX-VNNI nor AVX-512 VNNI")
    vnni = {"avx_vnni"} if "avx_vnni" in have else {"avx512_vnni", "avx512vl"}
    lib, why = q4kernel.build(q4kernel.compile_flags(frozenset({"avx2", "fma", "f16c"} | vnni)))
    assert lib is not None, why
    return lib


def _lanes_build(which: str):
    """(library, features per pack): this process's build (16-feature lanes with AVX-512 VNNI,
    8 with AVX2 alone or AVX-VNNI; skipped where it has none), the plain AVX2 one (8-feature
    lanes, on any CPU the kernel runs on) or an AVX-VNNI CPU's (8-feature lanes on vpdpbusd)."""
    if which == "native":
        _lanes_or_skip()
        return q4kernel._build()[0], q4kernel.lanes()
    lib = _plain_build() if which == "avx2" else _avx_vnni_build()
    return lib, lib.q4_lanes()


@pytest.mark.parametrize("which", ["native", "avx2", "avx-vnni"])
def test_packed_products_give_each_row_its_bits_alone(which):
    """A packed weight's product (q_linear_lanes): every row the same bits alone as in calls of
    2 to 300 rows at any position, on 1 or 2 threads; Q4_0 and Q4_1; k of whole groups, a
    partial one, an odd last block and wide (4,640); 16 features (one AVX-512 pack, two AVX2
    ones), 48 and 80 (a pack pair and a lone pack); bfloat16 in and out as torch rounds the
    float32 result; within 8-bit rounding of the float64 product; the packing undone gives the
    file's layout back. AVX-512: from 16 rows the wide tiles run (unpacked slices: k of 1, 3 and
    9 slices; each thread's packs in threes, a last one or two), below them lanes_tile (a pack
    at a time up to 4 rows, two beyond); AVX2: tiles of 8, 4, 2 and 1 rows, a pack at a time:
    the same bits."""
    lib, pack = _lanes_build(which)
    generator = torch.Generator().manual_seed(6)
    threads = torch.get_num_threads()
    measured = lib.q4_wide_rows(0)   # where this CPU starts them (tune_wide_rows): here from 16
    lib.q4_wide_rows(16)
    try:
        for k, n in ((96, 48), (576, 80), (1568, 16), (4640, 48)):
            for planes in (1, 2):
                qs, dm = _q4_weight(n, k, planes, generator)
                packed = q4kernel.to_lanes(qs, dm, pack)
                assert all(torch.equal(a, b) for a, b in zip(q4kernel.from_lanes(*packed, pack), (qs, dm)))
                assert not torch.equal(packed[0], qs)
                weight = q4kernel.dequantize(qs, dm)
                if pack == q4kernel.lanes():   # dequantize unpacks with this process's pack
                    assert torch.equal(q4kernel.dequantize(*packed, lanes=True), weight)
                x = torch.randn(300, k, generator=generator) * 3
                x[5] = 0
                exact = q4kernel.requantized(x).double() @ weight.double().T
                for nt in (1, 2):
                    torch.set_num_threads(nt)
                    alone = torch.cat([q4kernel.matmul(x[i:i + 1], *packed, lib=lib, lanes=True) for i in range(300)])
                    torch.testing.assert_close(alone.double(), exact, rtol=1e-5, atol=1e-4)
                    for m in (2, 3, 5, 8, 16, 18, 19, 37, 300):   # from 16 rows the wide tiles (4 rows and 1-3 more)
                        for start in (0, 300 - m, (300 - m) // 2):
                            batch = q4kernel.matmul(x[start:start + m], *packed, lib=lib, lanes=True)
                            assert torch.equal(batch, alone[start:start + m]), (k, n, planes, nt, m, start)
                half = x[:21].bfloat16()
                got = q4kernel.matmul(half, *packed, lib=lib, lanes=True)
                assert got.dtype == torch.bfloat16
                assert torch.equal(got, q4kernel.matmul(half.float(), *packed, lib=lib, lanes=True).bfloat16()), (k, n)
    finally:
        torch.set_num_threads(threads)
        lib.q4_wide_rows(measured)


@pytest.mark.parametrize("which", ["native", "avx-vnni"])
def test_lanes_give_the_plain_avx2_lanes_bits(which):
    """Every build's feature lanes run the same float operations in the same order for every
    (row, feature), block after block, on the same integers (vpdpbusd's, or vpmaddubsw and
    vpmaddwd's): this process's (AVX-512's 16 features) and an AVX-VNNI CPU's (8) give the plain
    AVX2 build's results bit for bit, float32 and bfloat16, from a lone row to a prompt's 40 (the
    AVX-512 wide tiles) and Q4_0 and Q4_1 alike."""
    lib, pack = _lanes_build(which)
    if which == "native" and q4kernel.compile_flags(q4kernel.cpu_flags()) == q4kernel.COMPILE:
        pytest.skip("this process's build is the plain AVX2 one (LLMHOST_CPU_FLAGS or the CPU)")
    assert which == "native" or pack == 8   # AVX-VNNI: packed too (it ran the tiles before)
    plain, eight = _lanes_build("avx2")
    generator = torch.Generator().manual_seed(9)
    measured = lib.q4_wide_rows(0)
    lib.q4_wide_rows(16)   # 40 rows on the wide tiles wherever this CPU starts them
    try:
        for k, n, planes in ((576, 64, 2), (1568, 48, 1)):
            qs, dm = _q4_weight(n, k, planes, generator)
            x = torch.randn(40, k, generator=generator)
            for rows in (x[:1], x[:7], x, x.bfloat16()):
                wide = q4kernel.matmul(rows, *q4kernel.to_lanes(qs, dm, pack), lib=lib, lanes=True)
                narrow = q4kernel.matmul(rows, *q4kernel.to_lanes(qs, dm, eight), lib=plain, lanes=True)
                assert torch.equal(wide, narrow), (k, rows.shape, rows.dtype)
    finally:
        lib.q4_wide_rows(measured)


def test_the_wide_tiles_start_where_they_were_measured_to_pay():
    """Where the build has the wide tiles (AVX-512 VNNI), the process measured
    at its first build from how many rows they compute a product faster than
    lanes_tile (tune_wide_rows: a candidate count, or never); builds without
    them answer 0. Measured again, the library keeps the new count."""
    plain, _ = _lanes_build("avx2")
    assert plain.q4_wide_rows(0) == 0 and plain.q4_wide_rows(16) == 0
    _lanes_or_skip()
    lib = q4kernel._build()[0]
    if not lib.q4_wide_rows(0):
        pytest.skip("this process's build has no wide tiles (AVX2 lanes)")
    assert lib.q4_wide_rows(0) in q4kernel.WIDE_CANDIDATES + (q4kernel.NEVER,)
    measured = q4kernel.tune_wide_rows(lib)
    assert measured in q4kernel.WIDE_CANDIDATES + (q4kernel.NEVER,) and lib.q4_wide_rows(0) == measured


def test_the_wide_tiles_are_never_chosen_on_one_measurement(monkeypatch):
    """tune_wide_rows measures again where a measurement says the wide tiles never pay (a
    spell of the host's can say so), up to `tries` times, and keeps the first count that
    pays; NEVER only when every try says so. The library holds what it returns."""
    _lanes_or_skip()
    lib = q4kernel._build()[0]
    if not lib.q4_wide_rows(0):
        pytest.skip("this process's build has no wide tiles (AVX2 lanes)")
    before = lib.q4_wide_rows(0)
    try:
        for said, expected, tries in (([96], 96, 1), ([q4kernel.NEVER, 128, 64], 128, 2),
                                      ([q4kernel.NEVER] * 3, q4kernel.NEVER, 3)):
            asked = []
            monkeypatch.setattr(q4kernel, "_wide_start", lambda lib: asked.append(1) or said[len(asked) - 1])
            assert q4kernel.tune_wide_rows(lib) == expected and lib.q4_wide_rows(0) == expected
            assert len(asked) == tries, (said, asked)
    finally:
        lib.q4_wide_rows(before)


def test_q4_layers_are_packed_where_their_features_fill_packs():
    """quantize.Q4Linear packs its weight where the features are a multiple of the pack (16
    features, or 8 on an AVX2-only CPU) and keeps the file's layout otherwise, computing the
    same product either way (to float32 rounding); a Q4Group of packed layers gives each
    layer's own bits, and group_q4 groups only layers that agree."""
    _lanes_or_skip()
    import numpy as np
    from gguf import GGMLQuantizationType, quantize

    from llmhost.models.quantize import Q4Group, group_q4, int4_from_gguf

    rng = np.random.default_rng(7)

    def layer(kind: str, n: int):
        blocks = quantize(rng.standard_normal((n, 576)).astype(np.float32), GGMLQuantizationType[kind])
        return int4_from_gguf(kind, blocks, np.arange(n), torch.float32), blocks

    (q, blocks), (k, _), (v, _) = layer("Q4_1", 64), layer("Q4_0", 32), layer("Q4_1", 32)
    assert q.lanes and k.lanes and v.lanes
    x = torch.randn(7, 576)
    some = 2 * q4kernel.lanes() + q4kernel.lanes() // 2   # q's first 2.5 packs of features
    odd = int4_from_gguf("Q4_1", blocks[:some], np.arange(some), torch.float32)
    assert not odd.lanes
    torch.testing.assert_close(odd(x), q(x)[:, :some], rtol=1e-5, atol=1e-5)
    assert torch.equal(q.dequantized()[:some], odd.dequantized())
    alone = [part(x) for part in (q, k, v)]
    group = Q4Group([q, k, v])
    assert group.lanes
    assert all(torch.equal(a, b) for a, b in zip(group(x), alone))
    attention = torch.nn.Module()
    attention.q_proj, attention.k_proj, attention.v_proj = odd, k, v
    assert group_q4(attention) == 0 and not hasattr(attention, "q4_group")


@pytest.mark.parametrize("which", ["native", "avx-vnni"])
def test_q8_lanes_read_the_files_blocks_and_give_each_row_its_bits_alone(which):
    """A tied Q8_0 embedding and head packed for the Q8_0 lanes (to_lanes8: 16 features a pack
    with AVX-512 VNNI without AMX, 8 with AVX-VNNI): looked-up rows are the file's dequantized
    ones (float32 exactly, bfloat16 as torch rounds them; an id outside the vocabulary raises
    IndexError); the head's product is within 8-bit rounding of the float64 one and every row
    has the same bits alone as in calls of 2 to 40 rows (1 to 8 a tile, a last short tile) on 1
    and 2 threads, and the same bits in both builds; bfloat16 in and out as torch rounds the
    float32 result."""
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize, quantize

    from llmhost.models.quantize import Q8Head, q8_embedding

    lib = q4kernel._build()[0] if which == "native" else _avx_vnni_build()
    pack = lib.q8_lanes() if lib is not None else 0
    if not pack:
        pytest.skip("this build has no Q8_0 lanes (AVX-512 VNNI without AMX, or AVX-VNNI)")
    rng = np.random.default_rng(4)
    threads = torch.get_num_threads()
    try:
        for v, k in ((48, 96), (64, 576), (32, 1568)):
            blocks = quantize((rng.standard_normal((v, k)) * 2).astype(np.float32), GGMLQuantizationType.Q8_0)
            weight = torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q8_0).copy())
            file_qs = torch.from_numpy(blocks.reshape(v, -1, 34)[..., 2:].copy().view(np.int8).reshape(v, k))
            file_dm = torch.from_numpy(blocks.reshape(v, -1, 34)[..., :2].copy().view(np.float16)[..., 0])[None]
            qs, dm = q4kernel.to_lanes8(file_qs, file_dm, pack)
            assert not torch.equal(qs, file_qs)
            ids = torch.tensor([[3, 0, v - 1], [1, 17, 2]])
            assert torch.equal(q4kernel.lanes8_rows(qs, dm, ids, pack), weight[ids])
            for bad in (v, -1):
                with pytest.raises(IndexError):
                    q4kernel.lanes8_rows(qs, dm, torch.tensor([[0, bad]]), pack)
            x = torch.randn(40, k, generator=torch.Generator().manual_seed(k)) * 3
            exact = q4kernel.requantized(x).double() @ weight.double().T
            for nt in (1, 2):
                torch.set_num_threads(nt)
                alone = torch.cat([q4kernel.matmul(x[i:i + 1], qs, dm, lib=lib, lanes=True) for i in range(40)])
                torch.testing.assert_close(alone.double(), exact, rtol=1e-5, atol=1e-4)
                for m in (2, 7, 8, 9, 17, 40):
                    assert torch.equal(q4kernel.matmul(x[:m], qs, dm, lib=lib, lanes=True), alone[:m]), (v, k, nt, m)
            half = x[:9].bfloat16()
            assert torch.equal(q4kernel.matmul(half, qs, dm, lib=lib, lanes=True),
                               q4kernel.matmul(half.float(), qs, dm, lib=lib, lanes=True).bfloat16())
            if which == "native":   # the modules on this build's packing
                embedding = q8_embedding(blocks, torch.float32)
                assert embedding.lanes and torch.equal(embedding.qs, qs)
                assert torch.equal(embedding(ids), weight[ids])
                assert torch.equal(q8_embedding(blocks, torch.bfloat16)(ids), weight[ids].bfloat16())
                assert torch.equal(Q8Head(embedding)(x), alone)
            elif q4kernel.q8_lanes() and q4kernel.q8_lanes() != pack:   # the other build's bits
                assert torch.equal(q4kernel.matmul(x, *q4kernel.to_lanes8(file_qs, file_dm, q4kernel.q8_lanes()),
                                                   lanes=True), alone)
    finally:
        torch.set_num_threads(threads)
