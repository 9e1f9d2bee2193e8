"""C kernels compiled on the machine that runs them: the CPU's flags, and one
C file built with the system's compiler and loaded through ctypes.

Why at run time rather than at install: the install then needs no compiler (a
machine without one, or a CPU without the instructions a kernel needs, keeps
torch's operators: the callers say which), and each library is built for the
CPU it runs on. Building takes about a second; the file is deleted once it is
loaded. Nothing is cached between processes. The kernels: the int4 matmul
(models/q4kernel.c), decode attention (engine/attention.c) and the Llama layers
around them (engine/llamastep.c).
"""
from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile

# every kernel's baseline: AVX2 with FMA and F16C, OpenMP threads (torch's libgomp)
CPU_FLAGS = ("avx2", "fma", "f16c")
COMPILE = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU feature flags llmhost plans for: this CPU's, from /proc/cpuinfo
    ("flags" on x86, "Features" on arm64; torch.backends.cpu.get_cpu_capability()
    says only 'AVX2' or 'AVX512', which covers CPUs with and without bf16),
    empty when unknown; only those named in LLMHOST_CPU_FLAGS where it is set
    (to run as on a CPU with fewer: docs/configuration.md)."""
    found = frozenset()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    found = frozenset(value.split())
                    break
    except OSError:
        pass
    only = os.environ.get("LLMHOST_CPU_FLAGS", "").replace(",", " ").split()
    return found & frozenset(only) if only else found


def missing_flags() -> list[str]:
    """The baseline's flags this CPU lacks (empty: the kernels can run)."""
    return [flag for flag in CPU_FLAGS if flag not in cpu_flags()]


def compile_library(source: str, flags: tuple[str, ...]) -> tuple[ctypes.CDLL | None, str]:
    """`source` compiled with `flags` and loaded: (the library, "") or (None, why not)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None, "no C compiler (cc or gcc; or set CC)"
    with tempfile.TemporaryDirectory(prefix="llmhost-native-") as folder:
        target = os.path.join(folder, "kernel.so")
        try:
            done = subprocess.run([compiler, *flags, source, "-o", target], capture_output=True,
                                  text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{compiler} failed: {exc}"
        if done.returncode:
            return None, f"{compiler} failed: {done.stderr.strip()[-500:]}"
        return ctypes.CDLL(target), ""
