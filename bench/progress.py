"""A progress line on stderr: done/total, images/s, ETA.

Why not tqdm: one dependency less, and the non-TTY behaviour matters here (CI logs, `2>`
to a file): there the bar becomes a plain line every few seconds instead of thousands of
carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

TTY_EVERY_S = 0.2
PLAIN_EVERY_S = 5.0


class Progress:
    def __init__(self, total: int, label: str = "", stream: TextIO | None = None,
                 tty: bool | None = None) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._last = 0.0

    def restart(self) -> None:
        """Count time from now (call once the work really starts, after any start-up)."""
        self.started = time.monotonic()

    def update(self, n: int = 1, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        now = time.monotonic()
        if now - self._last >= (TTY_EVERY_S if self.tty else PLAIN_EVERY_S):
            self._last = now
            self._show(final=False)

    def close(self) -> None:
        self._show(final=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        left = self.total - self.done
        eta = _clock(left / rate) if rate > 0 and left > 0 else ("0:00:00" if not left else "?")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        failed = f"  {self.failed} failed" if self.failed else ""
        return (f"{self.label}{self.done}/{self.total} ({pct:5.1f}%)  {rate:7.1f} img/s  "
                f"elapsed {_clock(elapsed)}  ETA {eta}{failed}")

    def _show(self, final: bool) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
