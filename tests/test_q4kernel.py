"""models/q4kernel.c's AMX path (a prefill's Q4 products on the tiles of a CPU with
AMX) gives the bits of its other tiles: every row the same alone as batched, the
same as the library built without AMX, so rows_alone holds (the prefix cache's
any-prefix reuse rests on it). Runs where the CPU has AMX; the flag choice anywhere."""
from __future__ import annotations

import pytest
import torch

from llmhost.engine import native
from llmhost.models import q4kernel

AMX_FLAGS = {"amx_tile", "amx_int8", "avx512_vnni", "avx512bw", "avx512vl"}


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
            qs = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator)
            dm = (torch.rand(planes, n, k // 32, generator=generator) * 0.02 - 0.005).half()
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
