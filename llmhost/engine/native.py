"""C kernels compiled on the machine that runs them: the CPU's flags, and one
C file built with the system's compiler and loaded through ctypes.

Why at run time rather than at install: the install then needs no compiler (a
machine without one, or a CPU without the instructions a kernel needs, keeps
torch's operators: the callers say which), and each library is built for the
CPU it runs on. Building one takes 0.3-3 s, and a process's first int4 load
builds all three (about 6 s here, the first load's critical path): so a built
library is kept in LLMHOST_CACHE_DIR (config.cache_dir), named after what went
into it (the source, the flags, the compiler's name and version), and the next
process loads it from there (library_cache). The kernels: the int4 matmul
(models/q4kernel.c), decode attention (engine/attention.c) and the Llama layers
around them (engine/llamastep.c).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading

from ..config import cache_dir

log = logging.getLogger(__name__)

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


KEPT = 16   # built libraries kept in the cache, the least recently used removed first


def once(build):
    """`build` (a library's, no arguments) run once per process, its result kept:
    a thread that asks while another builds waits for that build (so that
    prebuild's thread and a load never compile the same library twice)."""
    lock = threading.Lock()
    cached = functools.lru_cache(maxsize=1)(build)

    @functools.wraps(build)
    def built():
        with lock:
            return cached()
    built.cache_clear = cached.cache_clear
    return built


def prebuild(*builds) -> None:
    """Start `builds` (once-functions), a thread each: a load asks for its
    libraries one after the other (a CPU Llama's attention, an int4 load's two
    more), and with nothing kept they took about 6 s of an int4 SmolLM2's first 8,
    one compiler at a time; started together at the load's start they build
    beside each other and beside the GGUF header's child (docs/performance.md)."""
    for build in builds:
        threading.Thread(target=build, name="llmhost-prebuild", daemon=True).start()


def compile_library(source: str, flags: tuple[str, ...]) -> tuple[ctypes.CDLL | None, str]:
    """`source` compiled with `flags` and loaded: (the library, "") or (None, why not).
    From the cache when it was built there before (library_cache)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None, "no C compiler (cc or gcc; or set CC)"
    kept = library_cache(compiler, source, flags)
    if kept and os.path.exists(kept):
        try:
            lib = ctypes.CDLL(kept)
            os.utime(kept)   # recently used
            return lib, ""
        except OSError:   # a damaged file: built again below
            pass
    # built next to where it is kept (os.replace within one file system), else in /tmp
    with tempfile.TemporaryDirectory(prefix="llmhost-native-", dir=os.path.dirname(kept) or None) as folder:
        target = os.path.join(folder, "kernel.so")
        try:
            done = subprocess.run([compiler, *flags, source, "-o", target], capture_output=True,
                                  text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{compiler} failed: {exc}"
        if done.returncode:
            return None, f"{compiler} failed: {done.stderr.strip()[-500:]}"
        if kept:
            try:
                os.replace(target, kept)
                target = kept
                prune(os.path.dirname(kept), KEPT)
            except OSError:   # not kept (a full disk): loaded from the build folder
                pass
        return ctypes.CDLL(target), ""


def library_cache(compiler: str, source: str, flags: tuple[str, ...]) -> str:
    """Where the library built from `source` with `flags` by `compiler` is kept:
    a file of the cache's folder native named by a hash of all three (the
    compiler by its path and ``--version``), so an edited source, other flags
    (LLMHOST_CPU_FLAGS) or another compiler build anew; "" without a cache (off,
    or a folder that cannot be made: built in /tmp as before). The source's own
    headers (``#include "..."``, kernels' shared code: simd.h) join the key with
    it (local_sources); system headers are the compiler's, whose version is in
    the key."""
    folder = cache_folder("native")
    if not folder:
        return ""
    try:
        code = [text for _, text in local_sources(source)]
        version = _version(compiler)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    key = hashlib.sha256(b"\0".join([*code, *(f.encode() for f in flags),
                                      os.path.realpath(compiler).encode(), version])).hexdigest()
    name = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(folder, f"{name}-{key[:24]}.so")


_LOCAL_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def local_sources(source: str) -> list[tuple[str, bytes]]:
    """(path, text) of `source` and of every header it includes with quotes,
    theirs too, each once, relative to the file that names it (as the compiler
    finds them)."""
    found: dict[str, bytes] = {}
    waiting = [os.path.realpath(source)]
    while waiting:
        path = waiting.pop()
        if path in found:
            continue
        with open(path, "rb") as fh:
            found[path] = fh.read()
        waiting += [os.path.realpath(os.path.join(os.path.dirname(path), name.decode()))
                    for name in _LOCAL_INCLUDE.findall(found[path])]
    return list(found.items())


@functools.lru_cache(maxsize=4)
def _version(compiler: str) -> bytes:
    """`compiler --version`, asked once per process (each library's key has it)."""
    return subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout


def cache_folder(kind: str) -> str:
    """The folder `kind` of the cache (config.cache_dir, from the environment:
    one per process, as LLMHOST_CPU_FLAGS), made only its owner can write to
    (what it holds is loaded as code); "" without one, or where other users
    could write into it or swap it (private: a warning, once)."""
    root = cache_dir()
    if not root:
        return ""
    for path, held in ((root, False), (os.path.join(root, kind), True)):
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError:
            return ""
        if not private(path, held):
            if path not in _warned:
                _warned.add(path)
                log.warning("LLMHOST_CACHE_DIR: nothing is kept in %s: other users can write to "
                            "it; use a folder only this user can write to", path)
            return ""
    return path


_warned: set = set()


def private(path: str, held: bool) -> bool:
    """Whether other users cannot change what the cache folder `path` holds: it
    is this user's (or root's) and, for the folder that holds the entries
    (`held`), not writable by its group or others; for the cache's root, not
    writable by others unless sticky (as /tmp: no one renames another's entry).
    A kept library is loaded as code, and a kept header's config and tokenizer
    are read as the model's."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_uid not in (os.geteuid(), 0):
        return False
    if held:
        return not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    return not st.st_mode & stat.S_IWOTH or bool(st.st_mode & stat.S_ISVTX)


def prune(folder: str, keep: int) -> None:
    """Remove all but the `keep` most recently used entries of a cache folder
    (files or folders; a build or read in progress, a hidden temporary one, stays)."""
    try:
        entries = [e for e in os.scandir(folder) if not e.name.startswith((".", "llmhost-"))]
        entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    except OSError:
        return
    for entry in entries[keep:]:
        try:
            shutil.rmtree(entry.path) if entry.is_dir() else os.remove(entry.path)
        except OSError:
            pass
