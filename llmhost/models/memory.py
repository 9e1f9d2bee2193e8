"""Refuse a load that will not fit, before loading it (issue 9): a model too
big for the machine otherwise gets the worker OOM-killed, and every loaded
model with it.

The estimate reads only headers: safetensors (``safe_open`` reads the JSON
header, not the weights) and GGUF (its tensor table, from gguf.header).
transformers dequantizes GGUF weights, so a GGUF model takes its element count
times the dtype it is loaded in, not its file size. What is free: the smaller
of the cgroup's room (v2 ``memory.max - memory.current``, or v1) and
``MemAvailable`` for CPU, ``torch.cuda.mem_get_info`` per GPU, and
LLMHOST_MEMORY_LIMIT (bytes for all models together) when set. The model must
fit with LLMHOST_MEMORY_HEADROOM (a fraction of the estimate) to spare."""
from __future__ import annotations

import glob
import logging
import os

import torch

from ..engine.errors import NoRoom

log = logging.getLogger("llmhost")

_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
          "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def _target_bytes(dtype) -> int | None:
    """Bytes per element of the dtype the weights are loaded in; None: as stored."""
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    return None


def estimate(folder: str, gguf_file: str | None, dtype) -> int | None:
    """Bytes of weights once loaded; None when the files say nothing usable."""
    per = _target_bytes(dtype)
    if gguf_file:
        from .gguf import tensor_infos
        elements = sum(info[5] for info in tensor_infos(os.path.join(folder, gguf_file)))
        return elements * (per or 4)      # dequantized (float32 unless a dtype is given)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if files:
        from safetensors import safe_open
        total = 0
        for path in files:
            with safe_open(path, framework="pt") as fh:
                for name in fh.keys():
                    piece = fh.get_slice(name)
                    numel = 1
                    for dim in piece.get_shape():
                        numel *= int(dim)
                    total += numel * (per or _BYTES.get(piece.get_dtype(), 4))
        return total
    files = glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt"))
    return sum(os.path.getsize(p) for p in files) or None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            value = fh.read().strip()
        return None if value in ("", "max") else int(value)
    except (OSError, ValueError):
        return None


def free_cpu_bytes() -> int | None:
    candidates = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 2 ** 60:
            candidates.append(max(0, cap - used))
    return min(candidates) if candidates else None


def free_bytes(device: str) -> int | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        return int(torch.cuda.mem_get_info(index)[0])
    if device == "cpu":
        return free_cpu_bytes()
    return None     # mps, or several GPUs (device_map=auto): not checked


def check(model: str, folder: str, gguf_file: str | None, device: str, dtype, config,
          in_use: int = 0) -> None:
    """Raise a 507 when the model will not fit in what is free; `in_use` is what
    the loaded models hold (the registry knows it, this module does not)."""
    try:
        need = estimate(folder, gguf_file, dtype)
    except Exception as exc:   # unreadable headers: let the load itself report it
        log.debug("no memory estimate for %s: %s", model, exc)
        return
    if not need:
        return
    headroom = max(0.0, float(getattr(config, "MEMORY_HEADROOM", 0.2)))
    free = free_bytes(device)
    limit = int(getattr(config, "MEMORY_LIMIT", 0) or 0)
    where = f"free on {device}"
    if limit:
        used = in_use
        room = max(0, limit - used)
        if free is None or room < free:
            free, where = room, f"left of LLMHOST_MEMORY_LIMIT={limit} bytes ({_gib(used)} in use)"
    if free is None:
        return
    wanted = int(need * (1 + headroom))
    if wanted > free:
        raise NoRoom(f"Not enough memory to load '{model}': it needs about {_gib(need)} "
                     f"({need} bytes; {_gib(wanted)} with LLMHOST_MEMORY_HEADROOM="
                     f"{headroom:g}) and {_gib(free)} ({free} bytes) is {where}. Unload a "
                     "model, choose a smaller dtype, or another device.",
                       param="model", code="insufficient_memory")
