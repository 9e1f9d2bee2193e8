"""Per-minute limits as token buckets, the way OpenAI's headers describe them:
a bucket holds `limit` units, refills at `limit` per minute, and a request
takes its units up front or is refused with the time until they are there.

Why a bucket rather than fixed one-minute windows: a window lets a client send
twice the limit across a window edge, and its reset time jumps; a bucket's
`remaining` and `reset` are exact at every moment, which is what
x-ratelimit-remaining-* and x-ratelimit-reset-* promise. Every take and give
back happens under one lock, so concurrent requests never over-admit.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict


class Bucket:
    def __init__(self, limit: int, now: float) -> None:
        self.limit = limit
        self.level = float(limit)
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.level = min(self.limit, self.level + (now - self.stamp) * self.limit / 60.0)
        self.stamp = now

    def wait(self, units: float) -> float:
        """Seconds until `units` are in the bucket (0: now); never when the
        request asks more than the bucket holds (inf)."""
        if units > self.limit:
            return math.inf
        return max(0.0, (units - self.level) * 60.0 / self.limit)

    def reset(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.limit - self.level) * 60.0 / self.limit


class Buckets:
    """Buckets by (subject, kind), created on first use. Subjects come from the
    configured keys plus the digests of keys that presented themselves, so
    their number is bounded by the keys the server accepts; a cap keeps the
    least recently used ones in any case."""

    MAX = 100_000

    def __init__(self, clock=time.monotonic) -> None:
        self._lock = threading.Lock()
        self._buckets: OrderedDict[tuple[str, str], Bucket] = OrderedDict()
        self._clock = clock

    def _get(self, subject: str, kind: str, limit: int, now: float) -> Bucket:
        key = (subject, kind)
        bucket = self._buckets.get(key)
        if bucket is None or bucket.limit != limit:
            bucket = self._buckets[key] = Bucket(limit, now)
            while len(self._buckets) > self.MAX:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(key)
        bucket._refill(now)
        return bucket

    def take(self, subject: str, kind: str, limit: int, units: float) -> float:
        """Take `units` now and return 0, or take nothing and return the seconds
        to wait (inf: more than the limit itself)."""
        with self._lock:
            bucket = self._get(subject, kind, limit, self._clock())
            wait = bucket.wait(units)
            if wait == 0.0:
                bucket.level -= units
            return wait

    def give(self, subject: str, kind: str, limit: int, units: float) -> None:
        """Settle a reservation: positive units go back, negative ones are
        taken (the bucket may go below zero: the next request then waits)."""
        with self._lock:
            bucket = self._get(subject, kind, limit, self._clock())
            bucket.level = min(bucket.limit, bucket.level + units)

    def state(self, subject: str, kind: str, limit: int) -> tuple[int, float]:
        """(remaining, seconds until full) for the headers."""
        with self._lock:
            bucket = self._get(subject, kind, limit, self._clock())
            return max(0, math.floor(bucket.level)), bucket.reset()


def duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `120ms`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
