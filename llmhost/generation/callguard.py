"""Ending a choice that keeps calling tools: a repeated call, or one call too many.

Why: small models loop. SmolLM2 under the ``required`` call grammar (calls
with a separator, at least one, no upper bound, as ``parallel_tool_calls``
allows) writes ``get_weather({"city": "Paris"})`` again and again until
``max_tokens``, so the answer would end with ``finish_reason: "length"`` and a
pile of identical calls. OpenAI never returns two identical calls in one
answer (running the same call twice in parallel tells the client nothing new),
so the first repeat is where the model's answer really ended: the repeat is
dropped and the choice finishes with ``tool_calls``. ``LLMHOST_MAX_TOOL_CALLS``
bounds the calls of one choice the same way for loops whose arguments drift
(Paris, then Paris again with another unit, ...).

This works on the parsed OpenAI call deltas (generation/parsing.py), so it is the
same for every call syntax, streamed or not (both read the same deltas).
"""
from __future__ import annotations

import json


def _key(name: str, arguments: str):
    """Calls compare by name and arguments as JSON values (key order and
    spacing do not matter); arguments that are not JSON compare as text."""
    try:
        value = json.dumps(json.loads(arguments), sort_keys=True)
    except (TypeError, ValueError):
        value = arguments
    return name, value


class CallGuard:
    """One choice's released calls. `limit` is the most calls it may return
    (0: no limit)."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.seen: set = set()
        self.count = 0
        self.pending: dict[int, list[dict]] = {}   # deltas of calls not yet whole

    def check(self, deltas: list[dict], final: bool = False) -> tuple[list[dict], bool]:
        """(the deltas to send, whether the choice must end now). Deltas come as
        the parser releases them: a call's first delta (with `id` and the name),
        then its arguments in pieces. A call is judged once it is whole: its
        arguments parse as JSON (no proper prefix of a JSON object does), a
        later call starts, or the choice ends (`final`); until then its deltas
        wait (today's parser releases each call whole, so nothing waits). From
        the first repeated call or the first one over the limit on, nothing is
        sent."""
        for delta in deltas:
            self.pending.setdefault(delta["index"], []).append(delta)
        out: list[dict] = []
        indices = sorted(self.pending)
        for position, index in enumerate(indices):
            pieces = self.pending[index]
            name = next((d["function"].get("name") for d in pieces
                         if (d.get("function") or {}).get("name")), "")
            arguments = "".join((d.get("function") or {}).get("arguments") or "" for d in pieces)
            if not (final or position < len(indices) - 1 or _whole(arguments)):
                break
            del self.pending[index]
            key = _key(name, arguments)
            if key in self.seen or (self.limit and self.count >= self.limit):
                self.pending.clear()
                return out, True
            self.seen.add(key)
            self.count += 1
            out += pieces
        return out, False


def _whole(arguments: str) -> bool:
    try:
        json.loads(arguments)
    except (TypeError, ValueError):
        return False
    return True
