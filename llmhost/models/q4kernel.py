"""llmhost's int4 CPU kernel (q4kernel.c): built with the system's C compiler at
the first int4 load of a process, called through ctypes.

Why a kernel of our own: torch's int4 CPU kernel (``_weight_int4pack_mm_for_cpu``)
takes bfloat16 activations, which a CPU without AVX512-BF16 emulates, and the
other 4-bit CPU kernels of the libraries this project could use are not there
on such a CPU (torchao's x86 ones need AVX-512 and its PyPI wheel ships none,
Intel's extension stopped at torch 2.8). llama.cpp's scheme (8-bit activations
per block of 32 against the file's 4-bit blocks, integer dot products) is what
makes it fast on these CPUs; its code lives inside ggml, not a library torch can
call, so that arithmetic (a few hundred lines of C with AVX2 intrinsics) is
written here (docs/performance.md has the figures).

Compiled at run time (engine/native.py says why): a machine without a compiler,
or a CPU without AVX2, FMA and F16C, keeps torch's kernel (``available`` says
why).
"""
from __future__ import annotations

import ctypes
import logging
import os
import time

import torch

from ..engine.native import COMPILE, CPU_FLAGS, compile_library, cpu_flags, missing_flags, once
from .reclaim import trim

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(__file__), "q4kernel.c")
# vpdpbusd where the CPU has it (the same integers in fewer instructions: q4kernel.c); the
# AVX-512 kind first: its encoding has 32 vector registers, for taller tiles (q4kernel.c)
# (AVX-512 BW too: the feature lanes' nibble shifts, q4kernel.c). AVX-512 VNNI without BW
# (no CPU ships it; LLMHOST_CPU_FLAGS="avx2 fma f16c avx512_vnni avx512vl" names it) builds
# what an AVX-VNNI CPU builds, vpdpbusd on 256-bit vectors and the 8-feature lanes, with the
# EVEX encoding of the same instruction: an AVX-512 VNNI CPU runs llmhost as an AVX-VNNI one.
VNNI = ((("avx512_vnni", "avx512vl", "avx512bw"), ("-mavx512vnni", "-mavx512vl", "-mavx512bw")),
        (("avx_vnni",), ("-mavxvnni",)),
        (("avx512_vnni", "avx512vl"), ("-mavx512vnni", "-mavx512vl")))


# AMX's 8-bit tile products for the Q4 products of many rows (a prefill), where the CPU has
# them (Sapphire Rapids and later, which all have the AVX-512 parts it also uses):
# q4kernel.c's q_linear_amx
AMX = (("amx_tile", "amx_int8", "avx512_vnni", "avx512bw", "avx512vl"),
       ("-mamx-tile", "-mamx-int8", "-mavx512f", "-mavx512vnni", "-mavx512bw", "-mavx512vl"))


def compile_flags(flags: frozenset) -> tuple[str, ...]:
    """The compiler's flags for a CPU with `flags`: AVX2, FMA, F16C, VNNI
    when it has either kind, and AMX where it has it."""
    extra = next((extra for needs, extra in VNNI if set(needs) <= flags), ())
    return COMPILE + extra + (AMX[1] if set(AMX[0]) <= flags else ())


_P, _N = ctypes.c_void_p, ctypes.c_int64


@once
def _build() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, why not)."""
    missing = missing_flags()
    if missing:
        return None, f"the CPU lacks {', '.join(missing)}"
    lib, why = build(compile_flags(cpu_flags()))
    if lib is not None and lib.q4_wide_rows(0):
        start = tune_wide_rows(lib)
        trim()   # its ~10 MB of tensors and scratch, which glibc kept: 15 MiB of a worker's RSS
        log.info("int4 products of %d prompt rows or more run on the wide tiles (measured: q4kernel.c)", start)
    return lib, why


# prompt rows at which tune_wide_rows times the wide tiles against lanes_tile
WIDE_CANDIDATES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
NEVER = 1 << 40


def tune_wide_rows(lib, tries: int = 3) -> int:
    """The rows from which this CPU computes a packed product faster on the
    wide tiles than on lanes_tile (the same bits either way, q4kernel.c),
    measured (_wide_start), set in the library and returned. ~50 ms, once per
    process (the first int4 load). Measured because it differs between CPUs:
    16 rows on an Ice Lake Xeon, ~96-128 on a Zen 5 EPYC (thirty-third
    session). NEVER only when `tries` measurements in a row say so: on the
    shared Zen 5 machine 4 of ~60 measurements had the wide tiles slower at
    every count (1.8-2.0x lanes_tile's time at 16 rows, 1.13-1.17x at 512;
    1.3x at 512 and 1,024 rows in other processes of the same minutes), a spell
    of the host's that later processes did not see, while NEVER would cost a
    long prompt's prefill ~7-15% for the rest of the server's life (the wide
    tiles' share of it times their gain; thirty-fourth session)."""
    for _ in range(tries):
        start = _wide_start(lib)
        if start != NEVER:
            break
    lib.q4_wide_rows(start)
    return start


def _wide_start(lib) -> int:
    """One measurement for tune_wide_rows: both paths timed on a random
    1,536 x 1,024 Q4_1 weight at each candidate count, in turn, the best of 5;
    the count from which the wide tiles save the most time summed over the
    candidates from there on (each candidate's time relative to lanes_tile's:
    one noisy figure does not move it), NEVER where they save none."""
    generator = torch.Generator().manual_seed(0)
    k, n = 1024, 1536
    qs = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator)
    dm = (torch.rand(2, n, k // 32, generator=generator) * 0.02).half()
    qs, dm = to_lanes(qs, dm, lib.q4_lanes())
    x = torch.randn(WIDE_CANDIDATES[-1], k, generator=generator)
    for start in (1, NEVER, 1, NEVER):   # untimed: the threads' pool, the pages, the clock ramp up
        lib.q4_wide_rows(start)
        matmul(x, qs, dm, lib, lanes=True)
    saved = []   # per candidate: 1 - the wide tiles' time / lanes_tile's
    for m in WIDE_CANDIDATES:
        best: dict[int, float] = {}
        for _ in range(5):
            for start in (m, NEVER):   # the wide tiles for these m rows, then lanes_tile
                lib.q4_wide_rows(start)
                began = time.perf_counter()
                matmul(x[:m], qs, dm, lib, lanes=True)
                best[start] = min(best.get(start, 1e9), time.perf_counter() - began)
        saved.append(1 - best[m] / best[NEVER])
    gains = [sum(saved[i:]) for i in range(len(saved))]
    return WIDE_CANDIDATES[gains.index(max(gains))] if max(gains) > 0 else NEVER


def build(flags: tuple[str, ...]) -> tuple[ctypes.CDLL | None, str]:
    """q4kernel.c compiled with `flags` and loaded: (the library, "") or (None, why not)."""
    lib, why = compile_library(SOURCE, flags)
    if lib is None:
        return None, why
    lib.q4_requantize.argtypes = [_P, _N, _N, _P, ctypes.c_int]
    lib.q4_dequantize.argtypes = [_P, _P, _P, _N, _N, _P, ctypes.c_int]
    for fn in [lib.q_linear] + ([lib.q_linear_lanes] if lib.q4_lanes() else []):   # lanes: where built
        fn.argtypes = [ctypes.c_int, _P, ctypes.c_int, _N, _N, _P, _P, _P, _N, _P, ctypes.c_int]
        fn.restype = ctypes.c_int
    lib.q8_lanes_rows.argtypes = [_P, _P, _N, _P, _N, _N, _N, _P]
    lib.q4_wide_rows.argtypes, lib.q4_wide_rows.restype = [_N], _N
    for fn in (lib.q4_requantize, lib.q4_dequantize):
        fn.restype = None
    # the tiles, where the build has them and Linux grants this process their state
    rows = lib.q4_amx_enable()
    if rows:
        log.info("int4 products of %d rows or more run on AMX tiles", rows)
    elif lib.q4_lanes():
        log.info("int4 products run on feature lanes (weights of %d-feature multiples packed at load)",
                 lib.q4_lanes())
    return lib, ""


def available() -> tuple[bool, str]:
    """(True, "") when the kernel runs here, else (False, the reason), logged once."""
    lib, reason = _build()
    if lib is None and not getattr(_build, "logged", False):
        _build.logged = True
        log.info("int4 loads use torch's int4 kernel: llmhost's AVX2 kernel is unavailable (%s)", reason)
    return lib is not None, reason


def lanes() -> int:
    """Features per pack where this process's build computes packed Q4 weights
    (q4kernel.c's feature lanes: 16 with AVX-512 VNNI without AMX, 8 with AVX2,
    without VNNI or with AVX-VNNI), else 0 (AMX builds, or no kernel)."""
    lib, _ = _build()
    return lib.q4_lanes() if lib is not None else 0


def q8_lanes() -> int:
    """Features per pack where this process's build computes packed Q8_0
    weights (q4kernel.c's Q8_0 lanes: 16 with AVX-512 VNNI without AMX, 8 with
    AVX-VNNI), else 0."""
    lib, _ = _build()
    return lib.q8_lanes() if lib is not None else 0


def to_lanes8(qs: torch.Tensor, dm: torch.Tensor, pack: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 weight (qs int8 [N, K], dm float16 [1, N, K / 32]; N a multiple of
    the pack) packed for the Q8_0 lanes: per `pack` features (default:
    q8_lanes()) and block, dword j
    (inputs 4j..4j+3) of each feature side by side (j = 0..7), each weight plus
    128 (its byte's top bit flipped: q4kernel.c reads them unsigned); the same
    shapes and dtypes."""
    pack = pack or q8_lanes()
    n, k = qs.shape
    qs = (qs.view(torch.uint8) ^ 0x80).view(n // pack, pack, k // 32, 8, 4).permute(0, 2, 3, 1, 4)
    return qs.contiguous().view(torch.int8).view(n, k), _pack_planes(dm, n, pack)


def lanes8_rows(qs: torch.Tensor, dm: torch.Tensor, ids: torch.Tensor, pack: int = 0) -> torch.Tensor:
    """Rows `ids` (any shape) of a to_lanes8 weight (packs of `pack` features;
    default: q8_lanes()), dequantized: float32 [*ids, K], q * d (exact;
    q4kernel.c's q8_lanes_rows)."""
    lib = _build()[0]
    n, k = qs.shape
    ids = ids.to(torch.int64).contiguous()
    out = torch.empty(*ids.shape, k)
    if lib.q8_lanes_rows(qs.data_ptr(), dm.data_ptr(), n, ids.data_ptr(), ids.numel(), k, pack or q8_lanes(),
                         out.data_ptr()):
        raise IndexError(f"index out of range in self: token ids must be in 0..{n - 1}")
    return out


def to_lanes(qs: torch.Tensor, dm: torch.Tensor, pack: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q4 weight (matmul's qs, dm; N a multiple of the pack) packed for the
    feature lanes, the same shapes: per `pack` features (default: lanes()) and
    block, dword j of each feature's nibbles side by side (j = 0..3), and each
    plane's `pack` values of the block."""
    pack = pack or lanes()
    n, half = qs.shape
    nb = half // 16
    qs = qs.view(n // pack, pack, nb, 4, 4).permute(0, 2, 3, 1, 4).contiguous().view(n, half)
    return qs, _pack_planes(dm, n, pack)


def _pack_planes(dm: torch.Tensor, n: int, pack: int) -> torch.Tensor:
    """Each plane of dm [planes, N, blocks]: per `pack` features, a block's values side by side."""
    return dm.view(dm.shape[0], n // pack, pack, -1).transpose(2, 3).contiguous().view(dm.shape)


def from_lanes(qs: torch.Tensor, dm: torch.Tensor, pack: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """to_lanes undone: the file's layout."""
    pack = pack or lanes()
    n, half = qs.shape
    nb = half // 16
    qs = qs.view(n // pack, nb, 4, pack, 4).permute(0, 3, 1, 2, 4).contiguous().view(n, half)
    dm = dm.view(dm.shape[0], n // pack, nb, pack).transpose(2, 3).contiguous().view(dm.shape)
    return qs, dm


def matmul(x: torch.Tensor, qs: torch.Tensor, dm: torch.Tensor, lib=None, lanes: bool = False) -> torch.Tensor:
    """[M, N]: x [M, K] times a weight transposed: Q4 (qs uint8 [N, K / 2], dm
    float16 [2, N, K / 32]: d and m; Q4_0 [1, N, K / 32]: d, m = -8 d) or Q8_0
    (qs int8 [N, K], dm float16 [1, N, K / 32]: d). bfloat16 for bfloat16 x
    (the library reads and writes it: the same bits as the float32 product's
    ``.bfloat16()``, without two tensor conversions a call), else float32. One
    call into the library (it quantizes x too): ~5 us of Python per layer.
    `lib`: another build of the library (tests), instead of this process's;
    `lanes`: a Q4 weight packed by to_lanes (lanes() > 0), or a Q8_0 one by
    to_lanes8 (q8_lanes() > 0)."""
    lib = lib or _build()[0]
    bf16 = x.dtype == torch.bfloat16
    x = x.contiguous() if bf16 else x.float().contiguous()
    n, m, k = qs.shape[0], x.shape[0], x.shape[1]
    out = torch.empty(m, n, dtype=x.dtype)
    product = lib.q_linear_lanes if lanes else lib.q_linear
    if product(_bits(qs), x.data_ptr(), bf16, m, k, qs.data_ptr(), *_planes(dm), n, out.data_ptr(),
               torch.get_num_threads()):
        raise torch.OutOfMemoryError(f"int4 kernel: no memory for {m} x {k} activations")
    return out


def _bits(qs: torch.Tensor) -> int:
    return 8 if qs.dtype == torch.int8 else 4


def _planes(dm: torch.Tensor) -> tuple[int, int]:
    """The addresses of d and m (0 without an m plane: Q4_0, whose m the kernel
    computes, and Q8_0), without indexing (a tensor op each: ~1 us)."""
    d = dm.data_ptr()
    return d, d + dm.stride(0) * dm.element_size() if dm.shape[0] == 2 else 0


def native(qs: torch.Tensor, dm: torch.Tensor, lanes: bool = False) -> tuple[int, int, int, int, int, int]:
    """What engine/llamastep.c needs to compute this product itself: (the
    address of q_linear, or of q_linear_lanes for a packed weight, bits, output
    features, the addresses of qs, d and m)."""
    lib = _build()[0]
    return (ctypes.cast(lib.q_linear_lanes if lanes else lib.q_linear, ctypes.c_void_p).value, _bits(qs),
            qs.shape[0], qs.data_ptr(), *_planes(dm))


def dequantize(qs: torch.Tensor, dm: torch.Tensor, lanes: bool = False) -> torch.Tensor:
    """[N, K] float32 weights d * q + m (`lanes`: packed by to_lanes)."""
    lib, _ = _build()
    if lanes:
        qs, dm = from_lanes(qs, dm)
    n, k = qs.shape[0], qs.shape[1] * 2
    out = torch.empty(n, k)
    lib.q4_dequantize(qs.data_ptr(), *_planes(dm), n, k, out.data_ptr(), torch.get_num_threads())
    return out


def requantized(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the kernel sees it (its 8-bit blocks, back in float32): a
    prefill's dense matmul on these rows computes what the kernel would, to
    float32 rounding."""
    lib, _ = _build()
    x = x.float().contiguous()
    out = torch.empty_like(x)
    lib.q4_requantize(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out
