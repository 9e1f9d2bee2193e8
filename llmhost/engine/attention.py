"""llmhost's CPU attention (attention.c), for LlamaStep.

torch's CPU ``scaled_dot_product_attention`` runs a flash-attention kernel
made for many query rows; a decode step has one per head, and on SmolLM2 at
1,700 cached positions it took two thirds of the step (attention.c says how
much). This kernel does one query row of one key/value head per unit of work
in float32 (the keys and values read as stored, float32 or bfloat16), with the
row's mask, so it serves a lone row and a batch of left-padded rows alike.
Where the CPU has AMX (``amx_tile``, ``amx_bf16``) bfloat16 attention runs on
its tiles, a block of query rows per unit, each weight as two bfloat16s for the
values' products (16 of its 24 bits): a 512-token prompt's attention ~2.3x
faster than on the vectors, ~3.5x at 1,024 (docs/performance.md). Elsewhere
a prompt's rows run 16 (AVX-512) or 8 (AVX2) to a unit, a row a lane, with a
row's own operations in its order (1.5-2.0x a 512-token prompt's attention on
AVX-512; on AVX2 1.8x at 512 tokens, 2.2x at 1,024).

A row's result depends only on its own query and keys, never on the other rows
of the forward, its padding or the threads. LlamaStep runs every forward on it
where the linear layers compute rows alone too (``LlamaStep.rows_alone``): then
a position's keys and values are the same bits however they were computed, and
the prefix cache reuses any token prefix. Elsewhere it runs decode steps only,
and prefill keeps torch's attention, on which the whole-chunk reuse rests. Its
sums run in another order than torch's, so logits differ from ``model(...)``'s
in the last bits (tests/test_attention.py bounds the difference and checks
greedy answers).
"""
from __future__ import annotations

import ctypes
import logging
import os

import torch

from .native import COMPILE, compile_library, cpu_flags, missing_flags, once

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(__file__), "attention.c")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
AMX = ("-mamx-tile", "-mamx-bf16")
_P, _N = ctypes.c_void_p, ctypes.c_int64


@once
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(this process's library, "") or (None, why not), logged once."""
    missing = missing_flags()
    flags = compile_flags(cpu_flags())
    lib, why = (None, f"the CPU lacks {', '.join(missing)}") if missing else build(flags)
    if lib is None:
        log.info("decode steps use torch's attention: llmhost's is unavailable (%s)", why)
    elif AMX[0] in flags and lib.attention_amx():
        log.info("bfloat16 attention runs on AMX tiles")
    return lib, why


def compile_flags(flags: frozenset, tiles: bool = True) -> tuple[str, ...]:
    """The compiler's flags for a CPU with `flags`: AVX2, AVX-512's 16 lanes
    and bfloat16 scores where it has them, and AMX tiles where it has those
    (and `tiles`)."""
    wide = ("-mavx512f",) if "avx512f" in flags else ()   # 16 lanes where the CPU has them
    if wide and "avx512_bf16" in flags:
        wide += ("-mavx512bf16",)   # bfloat16 scores without widening the keys (attention.c)
        if tiles and {"amx_tile", "amx_bf16"} <= flags:
            wide += AMX   # bfloat16 attention on the tiles
    return COMPILE + wide


def build(flags: tuple[str, ...]) -> tuple[ctypes.CDLL | None, str]:
    """attention.c compiled with `flags` and loaded: (the library, "") or (None, why not)."""
    lib, why = compile_library(SOURCE, flags)
    if lib is None:
        return None, why
    lib.attend.argtypes = [ctypes.c_int, _P, _P, _P, _P, _N, _N, _N, _N, _N, _N, _P,
                           ctypes.c_float, _P, ctypes.c_int]
    lib.attend.restype = ctypes.c_int
    if AMX[0] in flags:
        lib.attention_amx.restype = ctypes.c_int
    return lib, ""


def supports(dtype: torch.dtype, device: torch.device, head_dim: int, heads: int,
             kv_heads: int) -> bool:
    """Whether `attend` runs for a model of this dtype, device and head size
    (builds the library the first time)."""
    return (device.type == "cpu" and dtype in DTYPES and head_dim % 16 == 0 and head_dim <= 256
            and heads // kv_heads <= 16 and _library()[0] is not None)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float, lib=None) -> torch.Tensor:
    """softmax(q k^T * scale) v per head, as transformers' attention functions
    return it: [batch, length, heads, dim]. q [batch, heads, length, dim], k
    and v [batch, kv_heads, keys, dim] (views of the cache, any strides with a
    contiguous last dimension), all one dtype; `mask` [batch, keys] (nonzero:
    a key the row may read; None: all), query row i reading keys up to
    keys - length + i. `lib`: another build of the library (tests), instead of
    this process's."""
    lib = lib or _library()[0]
    batch, heads, length, dim = q.shape
    keys = k.shape[2]
    out = torch.empty((batch, length, heads, dim), dtype=q.dtype)
    if mask is not None:
        mask = mask.to(torch.uint8).contiguous()
    # the three tensors' strides in one ctypes array (a tensor each cost ~2 us, per layer)
    strides = (ctypes.c_int64 * 9)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    if lib.attend(DTYPES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), strides, batch, heads,
                  k.shape[1], length, keys, dim, mask.data_ptr() if mask is not None else None,
                  scale, out.data_ptr(), torch.get_num_threads()):
        raise torch.OutOfMemoryError("attention: no memory for its scratch rows")
    return out
