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
are, not dequantized. On a CPU with AVX2, FMA and F16C, llmhost's kernel
(q4kernel.c, Q4Linear) keeps each Q4_0 / Q4_1 block's bytes (in the file's
order, or packed 16 output features side by side on AVX-512 VNNI without AMX,
8 with AVX2 alone or with AVX-VNNI: q4kernel.to_lanes) and multiplies them with
8-bit activations in integer instructions, as llama.cpp does; a tied Q8_0 token
embedding stays in its blocks too (Q8Embedding), the output head reading them
with the same kernel (Q8Head). Elsewhere (or with
LLMHOST_INT4_KERNEL=torch) torch's int4 CPU kernel runs (TorchInt4Linear): a
Q4 block (32 weights, w = d*q + m with q in 0..15) is exactly what it computes
(groups of 32 along the input, w = (q - 8)*scale + zero: scale = d, zero = m +
8d), with bfloat16 activations. Either way a decode step reads a quarter of
bfloat16's bytes for those layers. Tensors of other types (Q4_K, Q6_K, ...)
are dequantized as before.
"""
from __future__ import annotations

import functools
import sys

import torch

from . import q4kernel
from .q4kernel import cpu_flags

QUANTIZATIONS = ("int8", "int4")
INT4_GROUP = 32
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (Cooper Lake, Sapphire Rapids+), arm64


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (unknown: no, float32 is
    right everywhere)."""
    return bool(BF16_FLAGS & cpu_flags())


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
    weight (a torchao tensor subclass) counts its int8 data and scales, a
    weight kept in a GGUF file's blocks (PackedLinear, Q8Embedding) its bytes
    (as parameters: in x out), a tied head counts once."""
    seen: set = set()
    packed = [m for m in model.modules() if isinstance(m, (PackedLinear, Q8Embedding))] if count else []
    skip = {id(t) for m in packed for t in m.buffers(recurse=False)}

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

    shapes = {}
    for m in packed:   # a Q8Head and its Q8Embedding share their blocks: one count
        k, n = (m.embedding_dim, m.num_embeddings) if isinstance(m, Q8Embedding) else \
            (m.in_features, m.out_features)
        shapes[next(m.buffers(recurse=False)).data_ptr()] = k * n
    return sum(size(t) for t in model.state_dict(keep_vars=True).values()
               if isinstance(t, torch.Tensor) and id(t) not in skip) + sum(shapes.values())


KERNELS = ("llmhost", "torch")


class PackedLinear(torch.nn.Module):
    """A Linear layer whose weight stays in a GGUF file's quantized blocks
    (buffers, counted by model_bytes as in x out parameters)."""

    kernel = ""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None                                       # set by the loader if any

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self.rows(x.reshape(-1, shape[-1]))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kernel} kernel"


class Int4Linear(PackedLinear):
    """A Linear layer whose weight is a GGUF Q4_0 / Q4_1 tensor, run by an int4
    kernel for the few rows of a decode step; a prefill (``dense_rows`` rows
    or more) dequantizes the weight to float32 for that one matmul and drops it
    after. Two kernels (``kernel``), each with its own weight layout:
    ``Q4Linear``, llmhost's (8-bit activations, q4kernel.c), and
    ``TorchInt4Linear``, torch's (bfloat16 activations).

    ``dense_rows``: the rows (tokens times sequences) from which a step
    dequantizes the weight and runs one dense matmul instead of the kernel,
    whose time grows with the rows: where the two cost the same on an AVX2 CPU
    (`bench int4-prefill`, docs/performance.md)."""

    dense_rows = 64


class Q4Linear(Int4Linear):
    """The file's blocks (qs: 16 bytes of nibbles per block of 32, dm: its
    float16 d and m, w = d * q + m; a Q4_0 block's d alone, m = -8 d, which the
    kernel computes; ``lanes``: packed for the kernel's feature lanes, the same
    bytes in another order) and llmhost's AVX2 kernel
    (q4kernel.c): activations quantized to 8 bits per block of 32 as
    llama.cpp does, integer dot products. A prefill's dense matmul multiplies
    the same 8-bit activations (back in float32) by the dequantized weights,
    so both paths compute the same products and a prompt reads the same
    whichever runs it (to float32 rounding). Output in the input's dtype."""

    kernel = "llmhost"
    # Every row count runs on the kernel, whose result for a row is the same however many
    # rows share the call (engine/llamastep.py's ``rows_alone``: the prefix cache reuses any
    # token prefix of such a model). The dense path (bench int4-prefill forces it by setting
    # this) was faster only from 256 rows, on an AVX2 CPU (512 rows: 1042 against 1289 ms);
    # on the AVX-512 machine the kernel was faster at 512 rows too (664 against 799 ms).
    dense_rows = sys.maxsize
    rows_alone = True

    def __init__(self, qs: torch.Tensor, dm: torch.Tensor, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        # packed for the kernel's feature lanes where this CPU's build has them (AVX-512 VNNI
        # without AMX: ~1.9x faster products at any row count; AVX2 without VNNI: 1.1-1.4x;
        # AVX-VNNI: 1.3-1.6x, q4kernel.c), the same bytes
        pack = q4kernel.lanes()
        self.lanes = bool(pack) and out_features % pack == 0
        if self.lanes:
            qs, dm = q4kernel.to_lanes(qs, dm)
        self.register_buffer("qs", qs)     # uint8 [N, K / 2]
        self.register_buffer("dm", dm)     # float16 [2, N, K / 32] (Q4_0: [1, N, K / 32])

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.dense_rows:
            return torch.mm(q4kernel.requantized(x), self.dequantized().T).to(x.dtype)
        return q4kernel.matmul(x, self.qs, self.dm, lanes=self.lanes).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight, [N, K] float32."""
        return q4kernel.dequantize(self.qs, self.dm, lanes=self.lanes)

    def native_linear(self) -> tuple[int, ...]:
        """The product as engine/llamastep.c calls the kernel (q4kernel.native)."""
        return q4kernel.native(self.qs, self.dm, lanes=self.lanes)


class Q4Group:
    """Q4Linear layers that read the same input (a Llama layer's q/k/v, its
    gate/up), computed by one kernel call: one quantization of the input and
    one pass over the threads instead of one per layer (SmolLM2 int4: 150
    calls a step instead of 210). The layers' blocks are stored once, end to
    end, and each layer's buffers are views of its part, so the weights take no
    more memory and the layers still run alone (LoRA; bench int4-prefill's dense path).
    The kernel computes each output feature on its own, so the group's outputs
    are bit-identical to the layers'. Not a Module (its tensors are not in the
    state dict twice): the attention or MLP module holds it as ``q4_group``,
    which engine/llamastep.py calls."""

    def __init__(self, layers: list[Q4Linear]) -> None:
        self.layers = layers
        self.lanes = layers[0].lanes   # all or none: a pack's features end to end are packs
        self.sizes = [layer.out_features for layer in layers]
        self.qs = torch.cat([layer.qs for layer in layers])
        planes = max(layer.dm.shape[0] for layer in layers)   # a Q4_0 layer among Q4_1 ones: its m
        self.dm = torch.cat([layer.dm if layer.dm.shape[0] == planes
                             else torch.cat([layer.dm, (-8 * layer.dm.float()).half()])
                             for layer in layers], dim=1)
        start = 0
        for layer, size in zip(layers, self.sizes):
            layer.qs, layer.dm = self.qs[start:start + size], self.dm[:, start:start + size]
            start += size

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] >= Q4Linear.dense_rows:
            return [layer(x) for layer in self.layers]
        out = q4kernel.matmul(rows, self.qs, self.dm, lanes=self.lanes).to(x.dtype)
        return [part.view(*x.shape[:-1], part.shape[-1]) for part in out.split(self.sizes, -1)]

    def native_linear(self) -> tuple[int, ...]:
        """The group's product as engine/llamastep.c calls the kernel: its
        layers' outputs side by side (q4kernel.native)."""
        return q4kernel.native(self.qs, self.dm, lanes=self.lanes)


def group_q4(model: torch.nn.Module) -> int:
    """A Q4Group (``q4_group``) on each module whose q/k/v or gate/up
    projections are all Q4Linear layers without bias; how many were made."""
    made = 0
    for module in model.modules():
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            layers = [getattr(module, name, None) for name in names]
            if all(type(layer) is Q4Linear and layer.bias is None for layer in layers) and \
                    len({(layer.in_features, layer.lanes) for layer in layers}) == 1:
                module.q4_group = Q4Group(layers)
                made += 1
    return made


class TorchInt4Linear(Int4Linear):
    """torch's int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``, bfloat16
    activations), for CPUs where llmhost's kernel is unavailable
    (q4kernel.available) or when LLMHOST_INT4_KERNEL=torch. The prefill's
    float32 matmul uses the same weights and float32 accumulation as the
    kernel, output rounded to bfloat16 as the kernel's; only the order of the
    sums differs, so a logit may round the other way."""

    kernel = "torch"
    dense_rows = 64    # SmolLM2's 43-token prefill spent 88% of its time in this kernel

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, in_features: int,
                 out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("packed", packed)               # uint8 [N, K / 2]
        self.register_buffer("scales_zeros", scales_zeros)   # [K / 32, N, 2]
        self.block = int4_block_rows(out_features, in_features)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.scales_zeros.dtype
        if x.shape[0] >= self.dense_rows and self.block:
            return torch.mm(x.float(), self.dequantized().T).to(dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype).contiguous(), self.packed,
                                                          INT4_GROUP, self.scales_zeros)

    def dequantized(self) -> torch.Tensor:
        """The weight, [N, K] float32 (a transposed view): w = (q - 8) * scale +
        zero, what the int4 kernel computes per weight (one rounding, as its
        fused multiply-add)."""
        return unpack_int4(self.packed, self.scales_zeros, self.block).T


class Q8Embedding(torch.nn.Module):
    """A GGUF Q8_0 token embedding kept as the file stores it (int8 per weight,
    a float16 scale per block of 32: a quarter of float32's bytes), its rows
    dequantized as they are looked up, to exactly the values gguf's
    dequantization gives (q * d is exact in float32), then cast to `dtype`.
    With llmhost's kernel the tied output head (Q8Head) reads the same blocks,
    packed for its Q8_0 lanes where the build has them (``lanes``: the same
    bytes in another order, each plus 128; q4kernel.to_lanes8): a batch's
    head ran ~3x as fast at 8 rows, and the rows are read from there."""

    def __init__(self, qs: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qs.shape
        dm = d.unsqueeze(0)
        pack = q4kernel.q8_lanes()
        self.lanes = bool(pack) and self.num_embeddings % pack == 0
        if self.lanes:
            qs, dm = q4kernel.to_lanes8(qs, dm, pack)
        self.register_buffer("qs", qs)                 # int8 [V, K]
        self.register_buffer("dm", dm)                 # float16 [1, V, K / 32]
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.lanes:
            return q4kernel.lanes8_rows(self.qs, self.dm, ids).to(self.dtype)
        rows = self.qs[ids].view(*ids.shape, -1, INT4_GROUP).float()
        return (rows * self.dm[0][ids].float().unsqueeze(-1)).view(*ids.shape, -1).to(self.dtype)


class Q8Head(PackedLinear):
    """The output head tied to a Q8Embedding: the same blocks, llmhost's kernel
    (its Q8_0 product; the sampler asks for one row per sequence)."""

    kernel = "llmhost"

    def __init__(self, embedding: Q8Embedding) -> None:
        super().__init__(embedding.embedding_dim, embedding.num_embeddings)
        self.lanes = embedding.lanes
        self.register_buffer("qs", embedding.qs)
        self.register_buffer("dm", embedding.dm)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return q4kernel.matmul(x, self.qs, self.dm, lanes=self.lanes).to(x.dtype)


def q8_embedding(blocks, dtype: torch.dtype) -> Q8Embedding:
    """A Q8Embedding of a GGUF Q8_0 tensor's raw bytes (numpy uint8 [V, K / 32 * 34])."""
    import numpy as np

    data = np.asarray(blocks)
    v = data.shape[0]
    data = data.reshape(v, -1, 34)                              # [V, K / 32, d + 32 q]
    d = data[..., :2].copy().view(np.float16)[..., 0]
    qs = data[..., 2:].copy().view(np.int8).reshape(v, -1)
    return Q8Embedding(torch.from_numpy(qs), torch.from_numpy(d), dtype)


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


def int4_from_gguf(kind: str, blocks, rows, dtype: torch.dtype, kernel: str = "llmhost") -> Int4Linear:
    """An Int4Linear from a GGUF Q4_0 (`kind` "Q4_0") or Q4_1 tensor: `blocks`
    its raw bytes (numpy uint8, one row of blocks per output feature), `rows`
    the output-row order the model wants (an architecture's q/k permutation),
    `kernel` one of KERNELS (torch's computes in `dtype`)."""
    import numpy as np

    head = 4 if kind == "Q4_1" else 2
    data = np.asarray(blocks)[np.asarray(rows)]
    n = data.shape[0]
    data = data.reshape(n, -1, head + 16)                    # [N, K / 32, block]
    d = data[..., :2].copy().view(np.float16)[..., 0]
    m = data[..., 2:4].copy().view(np.float16)[..., 0] if head == 4 else None   # Q4_0: w = d * (q - 8)
    qs = data[..., head:]
    if kernel == "llmhost":   # Q4_0 keeps d alone: the kernel computes m = -8 d (q4kernel.c)
        return Q4Linear(torch.from_numpy(qs.reshape(n, -1).copy()),
                        torch.from_numpy(np.stack([d] if m is None else [d, m])), qs.shape[1] * 32, n)
    d = d.astype(np.float32)
    m = -8 * d if m is None else m.astype(np.float32)   # exact
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, -1)   # q of weight k in 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q.astype(np.int32)), 1)
    scales_zeros = torch.from_numpy(np.stack([d, m + 8 * d], axis=-1)).transpose(0, 1)
    return TorchInt4Linear(packed, scales_zeros.contiguous().to(dtype), q.shape[1], n)
