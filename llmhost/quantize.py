"""Smaller, faster weights on CPU: the dtype ``auto`` picks, and int8 weights.

bfloat16 halves the weights and, on a CPU with native bf16 instructions
(AVX512-BF16, AMX; ARMv8.6 BF16), doubles the speed of a decode step; on a CPU
without them torch emulates bf16 matmuls and float32 is faster, so ``auto``
picks bfloat16 only where the flags say so.

int8: see ``quantize_linear`` for the library chosen and why.
"""
from __future__ import annotations

import functools
import platform

import torch

QUANTIZATIONS = ("int8",)
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
    return platform.system() == "Darwin" and platform.machine() == "arm64"  # M2 and later


def auto_cpu_dtype() -> torch.dtype:
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def quantize_linear(linear: torch.nn.Module) -> torch.nn.Module:
    """One Linear layer with int8 weights, per output channel; returns the
    module that replaces it. (Library choice: see the module docstring.)"""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    linear.qconfig = per_channel_dynamic_qconfig
    return DynamicLinear.from_float(linear.float())


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
    """Bytes (with `count`: number) of the weights, int8 packed weights
    included (they are not parameters)."""
    total, seen = 0, set()
    for value in model.state_dict(keep_vars=True).values():
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor) and (t.data_ptr(), t.dtype) not in seen:
                seen.add((t.data_ptr(), t.dtype))  # a tied head is counted once
                total += t.numel() * (1 if count else t.element_size())
    return total
