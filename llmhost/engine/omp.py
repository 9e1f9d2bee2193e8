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
microseconds). Called by each model worker thread when it goes idle, by the
registry after a load, and after every HTTP request (create_app's teardown). Where torch
has no libgomp (macOS, other OpenMP runtimes) it does nothing.
"""
from __future__ import annotations

import ctypes
import functools

import torch  # noqa: F401  (loads torch's libgomp before _pause looks for it)

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
    pause = _pause()
    if pause is not None:
        pause(OMP_PAUSE_SOFT)
