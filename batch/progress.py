"""A progress line on stderr (done/total, images/s, elapsed, ETA), drawn by tqdm.

On a terminal it is tqdm's own line, redrawn in place. Elsewhere (CI logs, `2>` to a file)
the same text becomes a plain line every few seconds instead of thousands of carriage
returns: `_PlainLines` is tqdm with its display written as whole lines.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

TTY_EVERY_S = 0.2
PLAIN_EVERY_S = 5.0
BAR_FORMAT = ("{desc}{n_fmt}/{total_fmt} ({percentage:5.1f}%)  {rate_fmt}  "
              "elapsed {elapsed}  ETA {remaining}{postfix}")


class _PlainLines(tqdm):
    """tqdm whose every refresh is one complete line: no carriage return, no clearing."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":                   # tqdm clearing its line: nothing was drawn in place
            return False
        self.fp.write((self.__str__() if msg is None else msg) + "\n")
        self.fp.flush()
        return True

    def close(self) -> None:
        if self.disable:
            return
        self.display()                  # the final line, then tqdm's cleanup without its
        self.leave = False              # own last redraw and newline
        super().close()


class Progress:
    """Count images done (and failed) against a total; `close` prints the final line."""

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None,
                 tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.failed = 0
        kind = tqdm if self.tty else _PlainLines
        # smoothing 0: the rate (and ETA) since the start, not an average of the last few
        # updates, which a job done in blocks (Ray's) swings: "29 s/img" at 2.4 img/s
        self.bar: Any = kind(total=total, desc=label, file=self.stream, unit=" img",
                             bar_format=BAR_FORMAT, miniters=1, dynamic_ncols=self.tty,
                             smoothing=0,
                             mininterval=TTY_EVERY_S if self.tty else PLAIN_EVERY_S)

    @property
    def done(self) -> int:
        return int(self.bar.n)

    def restart(self) -> None:
        """Count time from now (call once the work really starts, after any start-up)."""
        self.bar.reset()

    def update(self, n: int = 1, failed: int = 0) -> None:
        if failed:
            self.failed += failed
            self.bar.set_postfix_str(f"  {self.failed} failed", refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
