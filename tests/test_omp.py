"""engine/omp.py: a thread's OpenMP workers are handed back when it goes idle,
so that one thread's parallel work never leaves workers behind that slow the
model threads' decode steps (libgomp stops spinning them once a process holds
more workers than CPUs)."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from llmhost.engine import omp


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _settled() -> int:
    """The process's threads once no exiting thread is left (an exited
    thread's OpenMP workers end a moment after it)."""
    count = _threads()
    for _ in range(50):
        threading.Event().wait(0.02)
        count, last = _threads(), count
        if count == last:
            break
    return count


def _parallel_work() -> None:
    torch.set_num_threads(2)
    torch.randn(1 << 21).exp_().sum()   # far above torch's grain: runs on an OpenMP team


@pytest.fixture(autouse=True)
def _needs_libgomp():
    if omp._pause() is None or torch.get_num_threads() < 2:
        pytest.skip("torch here has no libgomp, or one CPU")


def _in_thread(release: bool) -> tuple[int, int]:
    """(threads of the process while a thread that ran parallel work lives,
    before it exits), with and without omp.release()."""
    seen, go = [], threading.Event()

    def work():
        _parallel_work()
        if release:
            omp.release()
        seen.append(_threads())
        go.wait()

    before = _settled()
    thread = threading.Thread(target=work)
    thread.start()
    while not seen:
        thread.join(0.01)
    go.set()
    thread.join()
    return before, seen[0]


def test_release_hands_back_the_threads_workers():
    before, kept = _in_thread(release=False)
    assert kept >= before + 2          # the thread itself and its OpenMP worker
    for _ in range(3):   # in a whole run another test's leftover thread may start meanwhile (seen once)
        before, released = _in_thread(release=True)
        if released == before + 1:
            break
    assert released == before + 1      # the thread alone
    _parallel_work()                   # a released thread (here: this one) works again
    omp.release()


def _back_to(idle: int, seconds: float) -> float:
    """Seconds until the process has `idle` threads again (inf: not within `seconds`)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if _threads() == idle:
            return time.monotonic() - start
        threading.Event().wait(0.02)
    return float("inf")


def _scheduler(tiny_models, name: str, keep: float):
    from llmhost.config import TestConfig
    from llmhost.engine.scheduler import Scheduler
    from llmhost.models.loading import LoadSpec, load

    loaded = load(LoadSpec(model=tiny_models["llama"]), TestConfig())
    omp.release()                      # the load's, on this thread
    scheduler = Scheduler(name, loaded, TestConfig())
    scheduler.keep_pool_s = 0.0        # the warm-up's workers (Scheduler._warm) handed back at once
    scheduler.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with scheduler._cond:          # held: the thread is not between its warm-up and its wait
            if scheduler.warm_ms is not None and not scheduler._pool_warm:
                scheduler.keep_pool_s = keep
                return loaded, scheduler
        threading.Event().wait(0.01)
    raise AssertionError("the scheduler's warm-up did not end")


def _answer(loaded, scheduler, work: bool = True) -> None:
    """A request answered; with `work`, then parallel work on the scheduler's
    thread (a call between steps, which does not count as a step: the thread
    goes idle after it as it would without keep_pool_s)."""
    from llmhost.engine.sampling import SamplingParams
    from llmhost.engine.scheduler import GenerationRequest

    ids = loaded.tokenizer("hello")["input_ids"]
    list(scheduler.submit(GenerationRequest(ids, SamplingParams(max_tokens=4, temperature=0))).events())
    if work:
        scheduler.between_steps(_parallel_work)


def test_an_idle_model_worker_keeps_no_openmp_workers(tiny_models):
    """The scheduler's thread hands its workers back when it has nothing to
    do: at once with keep_pool_s 0, after it otherwise (a next request within
    it starts on them)."""
    loaded, scheduler = _scheduler(tiny_models, "tiny", 0.0)
    try:
        idle = _settled()
        _answer(loaded, scheduler)
        assert _back_to(idle, 2.0) < 2.0
        scheduler.keep_pool_s = 1.0
        _answer(loaded, scheduler, work=False)    # its steps ran on a team of 2 (omp.spread)
        threading.Event().wait(0.3)
        assert _threads() > idle                  # kept within keep_pool_s
        assert _back_to(idle, 3.0) < 3.0          # and handed back after it
    finally:
        scheduler.close("test over")


def test_a_worker_waking_takes_an_idle_ones_kept_workers_back(tiny_models):
    """Another model worker waking up to work makes one that keeps its
    OpenMP workers while idle hand them back at once, not after keep_pool_s
    (two pools on the cores would slow every parallel region of both)."""
    loaded, first = _scheduler(tiny_models, "first", 60.0)
    second = _scheduler(tiny_models, "second", 0.0)[1]
    try:
        idle = _settled()
        _answer(loaded, first, work=False)
        threading.Event().wait(0.3)
        assert _threads() > idle                  # first keeps its workers
        _answer(loaded, second)                   # second wakes, works, releases at once
        assert _back_to(idle, 5.0) < 5.0          # first's went too, long before 60 s
    finally:
        first.close("test over")
        second.close("test over")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU to run on")
def test_spread_pins_a_team_to_cpus_of_their_own_until_release():
    """omp.spread(2) after a release (a pool made anew, whose worker often
    starts on its maker's CPU): the two threads on two CPUs, the calling
    thread pinned to its own until omp.release() gives its mask back."""
    if omp._library() is None:
        pytest.skip("engine/omp.c does not build here")
    seen = []

    def work():
        mask = os.sched_getaffinity(0)
        for _ in range(3):
            _parallel_work()
            omp.release()
            threading.Event().wait(0.05)
            cpus = omp.spread(2)
            seen.append((cpus, os.sched_getaffinity(0)))
            omp.release()
            seen.append(os.sched_getaffinity(0) == mask)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    for (cpus, pinned), restored in zip(seen[::2], seen[1::2]):
        assert len(set(cpus)) == 2 and -1 not in cpus
        assert pinned == {cpus[0]}
        assert restored
