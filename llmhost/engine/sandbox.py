"""Chat template rendering that stops: a template is code from a model
repository or a client (`chat_template` at load time), and one that loops
(`{% for a in range(100000) %}{% for b in range(100000) %}`) would otherwise
keep a core busy forever and block the model's unload.

Why an asynchronous exception and not a process or a thread with a timeout:
a thread that misses its deadline keeps running (Python cannot kill it), and
a process per render costs a fork of a worker holding gigabytes of models.
Jinja compiles templates to Python bytecode, so ``PyThreadState_SetAsyncExc``
raises inside the render's own loop at the next bytecode boundary: the work
really stops, on the thread that started it. One watchdog thread measures
each render's CPU time (``pthread_getcpuclockid``), so a render slowed down
by a busy server is not refused for waiting on the GIL; a wall-clock cap
catches a render that blocks without using CPU."""
from __future__ import annotations

import ctypes
import logging
import threading
import time
from typing import Callable, TypeVar

from .errors import InvalidInput

log = logging.getLogger("llmhost")

T = TypeVar("T")

CPU_BUDGET_S = 2.0        # a real chat template renders in milliseconds
WALL_BUDGET_S = 20.0
_POLL_S = 0.05


class RenderBudgetExceeded(Exception):
    """Raised inside a render that ran past its budget."""


class _Watchdog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Signalled when a render starts: with none running the watchdog sleeps
        # on it rather than waking every _POLL_S, so it never takes the GIL
        # (and a core) from the decode thread between renders (issue 20).
        self._work = threading.Condition(self._lock)
        self._active: dict[int, tuple[int | None, float, float]] = {}
        self._thread: threading.Thread | None = None

    def start(self, cpu_budget: float, wall_budget: float) -> int:
        tid = threading.get_ident()
        try:
            clock = time.pthread_getcpuclockid(tid)
            cpu_start = time.clock_gettime(clock)
        except (AttributeError, OSError):   # not Linux: wall clock only
            clock, cpu_start = None, 0.0
        with self._lock:
            self._active[tid] = (clock, cpu_start + cpu_budget, time.monotonic() + wall_budget)
            self._work.notify()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._watch, name="llmhost-template-watchdog",
                                                daemon=True)
                self._thread.start()
        return tid

    def stop(self, tid: int) -> None:
        with self._lock:
            self._active.pop(tid, None)

    def _watch(self) -> None:
        while True:
            with self._lock:
                while not self._active:
                    self._work.wait()
            time.sleep(_POLL_S)
            now = time.monotonic()
            with self._lock:   # stop() takes this lock: no exception after a render ended
                for tid, (clock, cpu_deadline, wall_deadline) in list(self._active.items()):
                    try:
                        over = now > wall_deadline or (
                            clock is not None and time.clock_gettime(clock) > cpu_deadline)
                    except OSError:     # the thread is gone
                        self._active.pop(tid, None)
                        continue
                    if over:
                        self._active.pop(tid, None)
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(
                            ctypes.c_ulong(tid), ctypes.py_object(RenderBudgetExceeded))


_watchdog = _Watchdog()


def bounded(render: Callable[[], T], what: str, param: str,
            cpu_budget: float = CPU_BUDGET_S, wall_budget: float = WALL_BUDGET_S) -> T:
    """Run `render` on this thread; past the budget it is interrupted and the
    client gets a 400 naming `param`."""
    try:
        tid = _watchdog.start(cpu_budget, wall_budget)
        try:
            return render()
        finally:
            _watchdog.stop(tid)
    except RenderBudgetExceeded:
        log.warning("%s ran past its budget (%.1f s of CPU) and was stopped", what, cpu_budget)
        raise InvalidInput(f"{what} ran longer than {cpu_budget:g} s of CPU and was stopped; a "
                           "chat template must not loop without bound.", param=param,
                           code="chat_template_too_slow")
