"""engine/omp.py: a thread's OpenMP workers are handed back when it goes idle,
so that one thread's parallel work never leaves workers behind that slow the
model threads' decode steps (libgomp stops spinning them once a process holds
more workers than CPUs)."""
from __future__ import annotations

import os
import threading

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


def test_an_idle_model_worker_keeps_no_openmp_workers(tiny_models):
    """The scheduler's thread hands its workers back when it has nothing to do."""
    from llmhost.config import TestConfig
    from llmhost.engine.sampling import SamplingParams
    from llmhost.engine.scheduler import GenerationRequest, Scheduler
    from llmhost.models.loading import LoadSpec, load

    loaded = load(LoadSpec(model=tiny_models["llama"]), TestConfig())
    omp.release()                      # the load's, on this thread
    scheduler = Scheduler("tiny", loaded, TestConfig()).start()
    try:
        idle = _settled()
        ids = loaded.tokenizer("hello")["input_ids"]
        gen = scheduler.submit(GenerationRequest(ids, SamplingParams(max_tokens=4, temperature=0)))
        list(gen.events())
        scheduler.between_steps(_parallel_work)   # parallel work on the scheduler's thread
        for _ in range(100):                      # it goes idle right after
            if _threads() == idle:
                break
            threading.Event().wait(0.02)
        assert _threads() == idle
    finally:
        scheduler.close("test over")
