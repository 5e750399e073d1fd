"""Storage episodes: a disk that fills fails masks in runs, and a nearly full one fails
some and stores others (a small mask still fits). The log gets one warning when an episode
starts and one line when it is over, not a line per image or per flap."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pspnet.core import wire

CALM_S = 2.0          # an episode is over once masks are stored this long after a failure,
CALM_MASKS = 8        # or this many in a row are


class StorageEpisode:
    """Watches answers for masks that could not be stored (cause "storage")."""

    def __init__(self, log: Any, clock: Callable[[], float] = time.monotonic,
                 calm_s: float = CALM_S, calm_masks: int = CALM_MASKS) -> None:
        self.log = log
        self.clock = clock
        self.calm_s = calm_s
        self.calm_masks = calm_masks
        self.failed = 0                 # masks not stored in this episode (0: none open)
        self.stored_since = 0           # masks stored since the episode's last failure
        self.last_failure = 0.0

    def saw(self, result: wire.Result) -> None:
        if result.cause == wire.STORAGE:
            if self.failed == 0:
                self.log.warning("masks cannot be stored; answering them as errors until "
                                 "they can", error=result.error)
            self.failed += 1
            self.stored_since = 0
            self.last_failure = self.clock()
        elif result.status == wire.OK and result.mask:
            self.stored(1)

    def stored(self, masks: int) -> None:
        """`masks` ok answers with a stored mask (a message's columns at once)."""
        if self.failed and masks:
            self.stored_since += masks
            if (self.stored_since >= self.calm_masks
                    or self.clock() - self.last_failure >= self.calm_s):
                self.log.info("masks are stored again", failed_meanwhile=self.failed)
                self.failed = self.stored_since = 0
