"""Memory handed back to the OS: glibc's free lists (trim) and the pages of
library code the worker no longer runs (release_code_pages). No llmhost
imports, so the loader (models/gguf.py) and the registry both use it."""
from __future__ import annotations

import ctypes
import functools
import re


@functools.lru_cache(maxsize=1)
def libc():
    """glibc, as ctypes loads it; None elsewhere (musl, macOS)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim() -> None:
    """Hand freed memory back to the OS (glibc keeps what was freed in its heap)."""
    if libc() is not None and hasattr(libc(), "malloc_trim"):
        libc().malloc_trim(0)


MADV_DONTNEED = 4
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


def release_code_pages() -> int:
    """Unmap the worker's resident pages of library code and read-only data
    (Linux; the KiB released). Importing torch runs the static initialisers
    of its 500 MB of libraries, and a load runs model code once: about 80 MiB
    of code pages (libtorch_cpu's 55 among them) that a CPU worker serving
    SmolLM2 then counts in its RSS, of which two answers use a third, a mixed
    workload half (docs/performance.md, fifteenth session). Run after each
    load and at the worker's start (gunicorn_conf.post_worker_init).
    madvise(MADV_DONTNEED) on a file's private map drops them from this
    process only: they stay in the page cache, and a page run again faults back
    in from it (a minor fault), which is what the kernel does itself when
    memory is short. Only maps with no page of their own (smaps' Anonymous: 0)
    are released: a page the process wrote (code patched, relocated read-only
    data) would otherwise go back to the file's bytes."""
    try:
        with open("/proc/self/smaps") as fh:
            text = fh.read()
        madvise = libc().madvise
    except (OSError, AttributeError):   # not Linux, or not glibc: a hint only, never a failure
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        head, _, fields = block.partition("\n")
        found = _MAPPING.match(head)
        if not found or found[3] not in ("r-xp", "r--p") or not found[4].startswith("/"):
            continue
        sizes = dict(re.findall(r"^(\w+):\s+(\d+) kB", fields, re.M))
        if int(sizes.get("Rss", 0)) and sizes.get("Anonymous") == "0":
            start, end = int(found[1], 16), int(found[2], 16)
            if madvise(start, end - start, MADV_DONTNEED) == 0:
                released += int(sizes["Rss"])
    return released
