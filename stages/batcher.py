"""When the executor runs a batch, and at which built batch size: a work-conserving rule.

An idle device never waits for companions: the images queued now (those already taken,
plus any that have arrived and are only waiting to be read) run at once, at the smallest
built batch size that holds them (more than the largest: the largest, and the rest in the
next batch). Only while the device is busy does a batch keep filling, since it could not
run sooner anyway; `max_wait_ms` bounds that wait (past it, the partial batch is launched
behind the running one: a device with a queue starts it without a host round trip).

Pure: no sockets, no threads; the clock is injected, so the rule is tested without
processes (tests/stages/test_batcher.py) and the executor only asks it what to do next.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def size_for(queued: int, sizes: Sequence[int]) -> int:
    """The smallest of the built batch sizes (ascending) that holds `queued` images; the
    largest when none does."""
    if not sizes:
        raise ValueError("no built batch size")
    at = bisect.bisect_left(sizes, queued)
    return sizes[min(at, len(sizes) - 1)]


@dataclass(frozen=True)
class Step:
    """What the executor does next: run the batch at `size`, or wait at most `wait_s` for
    an image or for the device to free (None: no bound but the heartbeat's)."""

    run: bool
    size: int = 0
    wait_s: float | None = None
    waited_s: float = 0.0          # on run: how long the batch's first image waited


class Batcher:
    """The state of the batch being filled (when its first image came) and the rule."""

    def __init__(self, sizes: Sequence[int], max_wait_ms: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sizes = sorted(set(int(s) for s in sizes))
        if not self.sizes or self.sizes[0] < 1:
            raise ValueError(f"batch sizes must be >= 1, got {list(sizes)}")
        self.largest = self.sizes[-1]
        self.max_wait_s = max(0.0, max_wait_ms) / 1e3
        self.clock = clock
        self.first_at: float | None = None

    def begin(self) -> None:
        """A new, empty batch."""
        self.first_at = None

    def took(self) -> None:
        """One more image is in the batch."""
        if self.first_at is None:
            self.first_at = self.clock()

    def next(self, queued: int, arrived: bool, device_busy: bool) -> Step:
        """`queued`: images in the batch; `arrived`: more are ready to be read now;
        `device_busy`: a batch is on the device (running or queued)."""
        if queued >= self.largest:
            return self._run(self.largest)
        if arrived:
            return Step(run=False, wait_s=0.0)          # read what is there first
        if queued == 0:
            return Step(run=False, wait_s=None)
        if not device_busy:
            return self._run(size_for(queued, self.sizes))
        assert self.first_at is not None, "took() was not called for a queued image"
        left = self.first_at + self.max_wait_s - self.clock()
        if left <= 0:
            return self._run(size_for(queued, self.sizes))
        return Step(run=False, wait_s=left)

    def _run(self, size: int) -> Step:
        waited = 0.0 if self.first_at is None else self.clock() - self.first_at
        return Step(run=True, size=size, waited_s=waited)
