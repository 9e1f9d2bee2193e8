"""OpenMP worker threads: one thread's parallel work must not slow another's.

torch on Linux runs its parallel CPU work (and llmhost's int4 kernel, which
uses the same libgomp) on OpenMP. libgomp keeps a pool of worker threads for
every thread that ever ran a parallel region, for the life of that thread, and
while the process holds more such workers than the machine has CPUs it stops
letting them spin between regions: every parallel region then wakes its
workers through the kernel (futex), some 20 us each. A decode step has a few
hundred regions. So the request thread that loaded a model (its float
conversions ran in parallel) kept a pool that made every later decode step of
the scheduler thread ~1.8x slower (SmolLM2 int4, 2 cores: 16.2 against 9.0 ms
a step; one attention call 39 against 8-10 us while another thread's pool
lived), and an idle embedding worker would do the same to a chat model.

``release()`` hands the calling thread's pool back (OpenMP 5.0's
``omp_pause_resource_all(omp_pause_soft)``; libgomp frees only the caller's
pool); the next parallel region of that thread makes a new one (tens of
microseconds, and often a few milliseconds more: below). Called by each model
worker thread when it goes idle (the generation scheduler up to 30 s later,
Scheduler.keep_pool_s: queueing.py), by the registry after a load, and after
every HTTP request (create_app's teardown). Where torch has no libgomp (macOS,
other OpenMP runtimes) it does nothing.

``spread(n)``, before each step of a model thread (the scheduler's
``_threads``), pins its team of n threads to CPUs of their own until the
thread goes idle (``release`` unpins it): a pool made anew after a release, or
a worker woken after it slept, often starts on the CPU of the thread that made
or woke it, and the two then share one core until the kernel moves one, 4-10
ms later (omp.c). On the 2-core EPYC that was a lone user's time to first token
after a pause: SmolLM2 int4, a 42-token prompt, 0.5 s between requests
(docs/performance.md, thirtieth session).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading

import torch  # noqa: F401  (loads torch's libgomp before _pause looks for it)

from .native import compile_library, once

log = logging.getLogger(__name__)
SOURCE = os.path.join(os.path.dirname(__file__), "omp.c")
_pins = threading.local()   # .on: spread() pinned this thread

OMP_PAUSE_SOFT = 1


@functools.lru_cache(maxsize=1)
def _pause():
    """libgomp's omp_pause_resource_all, as loaded in this process (torch's
    own copy), or None."""
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "libgomp" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


def release() -> None:
    """Free the calling thread's OpenMP worker threads, if it has any (a no-op
    costing ~1 us otherwise). Not inside a parallel region."""
    if getattr(_pins, "on", False):   # spread() pinned this thread: its own CPUs back
        _library().omp_unpin()
        _pins.on = False
    pause = _pause()
    if pause is not None:
        pause(OMP_PAUSE_SOFT)


@once
def _library():
    """omp.c built and loaded (its omp_spread), or None where it cannot be
    (no compiler, no libgomp: spread() then does nothing)."""
    if _pause() is None:
        return None
    lib, why = compile_library(SOURCE, ("-O2", "-fopenmp", "-shared", "-fPIC"))
    if lib is None:
        log.info("OpenMP teams are left where the kernel puts them: omp.c is unavailable (%s)", why)
        return None
    lib.omp_spread.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.omp_spread.restype = ctypes.c_int
    lib.omp_unpin.argtypes, lib.omp_unpin.restype = [], None
    return lib


def spread(threads: int) -> list[int]:
    """Run a parallel region of `threads` threads on the calling thread's pool
    and pin each to a CPU of its own where one is free (omp.c), until
    ``release()``; the CPU each thread is on after it ([] where it cannot run).
    Not inside a parallel region."""
    lib = _library()
    if lib is None or threads < 2:
        return []
    cpus = (ctypes.c_int * threads)()
    lib.omp_spread(threads, cpus)
    _pins.on = True
    return list(cpus)
