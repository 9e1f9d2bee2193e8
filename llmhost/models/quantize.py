"""Smaller, faster weights on CPU: the dtype ``auto`` picks, and int8 weights.

bfloat16 halves the weights and, on a CPU with native bf16 instructions
(AVX512-BF16, AMX; ARMv8.6 BF16), doubles the speed of a decode step (SmolLM2
on this project's machine, HF generate: 50 against 24 tok/s at batch 1); on a CPU
without them torch emulates bf16 matmuls and float32 is faster, so ``auto``
picks bfloat16 only where the flags say so.

int8: weights only, per output channel, with torchao (``quantize_linear``
says why); the output head, tied to the input embedding in small models,
stays in the model's dtype.

int4 (GGUF files only): the file's own 4-bit Linear weights are kept as they
are, not dequantized. A Q4_0 / Q4_1 block (32 weights, w = d*q + m with q in
0..15) is exactly what torch's int4 CPU kernel computes (groups of 32 along
the input, w = (q - 8)*scale + zero: scale = d, zero = m + 8d), so the weights
equal the dequantized file's and a decode step reads a quarter of bfloat16's
bytes: at batch 1 a step of a model this size is bound by memory bandwidth,
not by arithmetic (docs/performance.md). Tensors of other types (Q4_K, Q6_K,
Q8_0, ...) are dequantized as before.
"""
from __future__ import annotations

import functools

import torch

QUANTIZATIONS = ("int8", "int4")
INT4_GROUP = 32
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (Cooper Lake, Sapphire Rapids+), arm64


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (from /proc/cpuinfo's flags;
    torch.backends.cpu.get_cpu_capability() says only 'AVX512', which covers
    CPUs with and without bf16)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return bool(BF16_FLAGS & set(value.split()))
    except OSError:
        pass
    return False  # unknown (no /proc/cpuinfo): float32, which is right everywhere


def auto_cpu_dtype() -> torch.dtype:
    """The rule: bfloat16 only with native bf16 instructions (avx512_bf16,
    amx_bf16, arm64 bf16), float32 otherwise (docs/performance.md has the
    figures and the command that measures them)."""
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def quantize_linear(linear: torch.nn.Module) -> torch.nn.Module:
    """One Linear layer with int8 weights, one scale per output channel,
    activations kept in the model's dtype (weight-only), in place.

    Why torchao's ``Int8WeightOnlyConfig``: measured here on SmolLM2-135M, 20
    fixed chat prompts, first 8 greedy tokens against float32 (``python -m
    llmhost.dev.bench quality``): torchao int8 weight-only agreed on 14/20 with no
    degenerate answer; torch's own dynamic quantization
    (``quantize_dynamic``, per-channel weights, int8 activations per tensor)
    agreed on 3/20 and answered two prompts with garbage (Hebrew letters, a
    loop), so it is not offered; torchao's int8 dynamic-activation scheme
    (per-token) agreed on 6/20. Quantizing activations costs this small model
    too much; quantizing weights only keeps its answers."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(linear, Int8WeightOnlyConfig())
    return linear


def quantize_model(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """Every Linear layer but the output head (tied to the input embedding in
    most small models, and the layer where int8 hurt answers most), in place."""
    if method not in QUANTIZATIONS:
        raise ValueError(method)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and module is not head:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, quantize_linear(module))
    return model


def model_bytes(model: torch.nn.Module, count: bool = False) -> int:
    """Bytes (with `count`: number of parameters) of the weights; a quantized
    weight (a torchao tensor subclass) counts its int8 data and scales, an
    Int4Linear its packed bytes and scales (as parameters: in x out), a tied
    head counts once."""
    seen: set = set()
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)] if count else []
    packed = {id(t) for m in int4 for t in (m.packed, m.scales_zeros)}

    def size(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):  # torchao: the inner tensors hold the data
            names, _ = t.__tensor_flatten__()
            inner = [size(getattr(t, name)) for name in names]
            return inner[0] if count else sum(inner)
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * (1 if count else t.element_size())

    return sum(size(t) for t in model.state_dict(keep_vars=True).values()
               if isinstance(t, torch.Tensor) and id(t) not in packed) + \
        sum(m.in_features * m.out_features for m in int4)


# Rows (tokens times sequences) from which a step dequantizes each int4 layer
# to float32 and runs one dense matmul instead of torch's int4 kernel, whose
# time grows with the rows (it is a decode kernel: SmolLM2's 43-token prefill
# spent 88% of its time in it). Where the two cost the same on an AVX2 CPU
# (64 tokens, docs/performance.md); shorter prompts keep the kernel.
MULTI_ROW_MIN = 64


class Int4Linear(torch.nn.Module):
    """A Linear layer (no bias) whose weight is a GGUF Q4_0 / Q4_1 tensor, run
    by torch's int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``) for the
    few rows of a decode step; a prefill (``MULTI_ROW_MIN`` rows or more)
    dequantizes the weight to float32 for that one matmul and drops it after:
    the same weights and the same float32 accumulation as the kernel, output
    rounded to bfloat16 as the kernel's; only the order of the sums differs,
    so a logit may round the other way (same error against float64 per layer;
    greedy answers compared in docs/performance.md)."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, in_features: int,
                 out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", packed)               # uint8 [N, K / 2]
        self.register_buffer("scales_zeros", scales_zeros)   # [K / 32, N, 2]
        self.bias = None                                       # set by the loader if any
        self.block = int4_block_rows(out_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        dtype = self.scales_zeros.dtype
        if x.shape[0] >= MULTI_ROW_MIN and self.block:
            out = torch.mm(x.float(), self.dequantized()).to(dtype)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype).contiguous(), self.packed,
                                                             INT4_GROUP, self.scales_zeros)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight, transposed ([K, N] float32): w = (q - 8) * scale + zero,
        what the int4 kernel computes per weight (one rounding, as its fused
        multiply-add)."""
        return unpack_int4(self.packed, self.scales_zeros, self.block)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group 32"


def unpack_int4(packed: torch.Tensor, scales_zeros: torch.Tensor, block: int) -> torch.Tensor:
    """[K, N] float32 weights of torch's CPU int4 packing. It stores the rows
    (N) in blocks of `block` (32 with AVX2, 64 with AVX-512); in a block, each
    input k has block/2 bytes, byte j holding row j (low nibble) and row
    j + block/2 (high nibble). Each nibble half, minus 8 (as int8), is copied
    into its columns as float32 (one pass that casts and transposes), then one
    in-place multiply-add applies scale and zero. Measured here: a third of the
    time of unpacking to a [N, K] byte tensor first, and scales and zeros are
    made contiguous first (read in place, with their stride of 2, the
    multiply-add did not vectorize)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    groups, half = k // INT4_GROUP, block // 2
    out = torch.empty(groups, INT4_GROUP, n // block, 2, half)
    nibbles = packed.view(n // block, groups, INT4_GROUP, half)
    for i, q in enumerate((nibbles & 15, nibbles >> 4)):
        out[..., i, :].copy_(q.view(torch.int8).sub_(8).permute(1, 2, 0, 3))
    out = out.view(groups, INT4_GROUP, n)
    scales, zeros = (scales_zeros[..., i].float().unsqueeze(1) for i in (0, 1))
    return torch.addcmul(zeros, out, scales, out=out).view(k, n)


@functools.lru_cache(maxsize=None)
def int4_block_rows(n: int, k: int) -> int | None:
    """The row block of torch's CPU int4 packing for an [n, k] weight on this
    CPU, found by packing a random weight and reading it back (the layout is
    torch's internal one, and depends on the CPU's vector width); None when
    unpack_int4 does not read it back exactly (a partial last block, or a
    torch that packs otherwise): such layers stay on the int4 kernel."""
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except RuntimeError:   # a shape the kernel does not take
        return None
    ones = torch.stack([torch.ones(k // INT4_GROUP, n), torch.full((k // INT4_GROUP, n), 8.0)], -1)
    for block in (64, 32, 16):
        if n % block == 0 and torch.equal(unpack_int4(packed, ones, block), q.T.float()):
            return block
    return None


def int4_from_gguf(kind: str, blocks, rows, dtype: torch.dtype) -> Int4Linear:
    """An Int4Linear from a GGUF Q4_0 (`kind` "Q4_0") or Q4_1 tensor: `blocks`
    its raw bytes (numpy uint8, one row of blocks per output feature), `rows`
    the output-row order the model wants (an architecture's q/k permutation)."""
    import numpy as np

    head = 4 if kind == "Q4_1" else 2
    data = np.asarray(blocks)[np.asarray(rows)]
    n = data.shape[0]
    data = data.reshape(n, -1, head + 16)                    # [N, K / 32, block]
    d = data[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = data[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if head == 4 \
        else -8 * d                                            # Q4_0: w = d * (q - 8)
    qs = data[..., head:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, -1)   # q of weight k in 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q.astype(np.int32)), 1)
    scales_zeros = torch.from_numpy(np.stack([d, m + 8 * d], axis=-1)).transpose(0, 1)
    return Int4Linear(packed, scales_zeros.contiguous().to(dtype), q.shape[1], n)

