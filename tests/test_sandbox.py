"""The chat-template watchdog (engine/sandbox.py) stops a render that runs
past its CPU budget, and sleeps while no render runs, so that it never takes
the GIL or a core from a decode step between renders (issue 20)."""
import sys
import time

import pytest

from llmhost.engine import sandbox
from llmhost.engine.errors import InvalidInput


def _waiting_for_work(thread) -> bool:
    frame = sys._current_frames().get(thread.ident)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return "wait" in names and "_watch" in names


def test_the_watchdog_sleeps_between_renders_and_still_stops_a_loop():
    assert sandbox.bounded(lambda: "ok", "a template", "chat_template") == "ok"
    thread = sandbox._watchdog._thread
    deadline = time.monotonic() + 5
    while not _waiting_for_work(thread) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _waiting_for_work(thread), "the watchdog polls while no render runs"

    def loop():
        while True:
            pass

    with pytest.raises(InvalidInput) as err:
        sandbox.bounded(loop, "a template", "chat_template", cpu_budget=0.2, wall_budget=5)
    assert err.value.param == "chat_template"
    assert sandbox.bounded(lambda: 1, "a template", "chat_template") == 1
