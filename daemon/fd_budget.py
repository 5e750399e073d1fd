"""The front's one budget of file descriptors, kept below the soft RLIMIT_NOFILE.

Why one: the client door, the /metrics HTTP server, the tcp ports and the restarts of
workers all draw from the same table of descriptors, and libzmq aborts the whole process
when an ipc accept meets EMFILE. So every listener asks this budget before it takes a new
connection, and RESERVE_FDS stay free for what cannot be refused: ZeroMQ's own sockets and
pipes, files, a worker's start and the connections already in a listen backlog. A few
placeholder descriptors are held that are let go only to start a worker (`reserve`), so a
restart never fails for lack of one.

The soft limit is raised to the hard one first; the budget is what is left under it.
"""

from __future__ import annotations

import errno
import os
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

RESERVE_FDS = 64             # kept free: own sockets, files, restarts, the backlog, a burst
SPAWN_FDS = 16               # placeholders let go to start a worker (pipes, its socket)
UNLIMITED = 1 << 20          # RLIM_INFINITY read as this many
REFUSED_LOG_EVERY_S = 10.0   # refused connections: one log line per listener this often


class FdBudget:
    def __init__(self) -> None:
        self.log = structlog.get_logger().bind(component="fd-budget")
        self.limit = 0
        self.threshold = 0                       # open descriptors at which listeners refuse
        self._placeholders: list[int] = []
        self._refused: dict[str, tuple[float, int]] = {}   # listener: (last line, since)
        self._lock = threading.Lock()

    def claim(self) -> None:
        """Raise the soft limit to the hard one, fix the threshold, hold the placeholders."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            self.log.info("raised the open-files limit", was=soft, now=hard)
            soft = hard
        self.limit = soft if soft != resource.RLIM_INFINITY else UNLIMITED
        self.threshold = self.limit - RESERVE_FDS
        self._placeholders = [os.open(os.devnull, os.O_RDONLY) for _ in range(SPAWN_FDS)]

    def room(self) -> int:
        """Descriptors a listener may still take (0 or less: refuse new connections)."""
        return self.threshold - open_fds()

    def refused(self, listener: str, **fields: object) -> None:
        """A connection refused for lack of room: logged at most every REFUSED_LOG_EVERY_S
        per listener, with how many were refused since the last line."""
        now = time.monotonic()
        with self._lock:
            last, count = self._refused.get(listener, (-1e9, 0))
            count += 1
            if now - last < REFUSED_LOG_EVERY_S:
                self._refused[listener] = (last, count)
                return
            self._refused[listener] = (now, 0)
        self.log.warning("connection refused: descriptor budget or connection cap reached",
                         listener=listener, refused=count, threshold=self.threshold,
                         open_fds=open_fds(), **fields)

    @contextmanager
    def reserve(self) -> Iterator[None]:
        """Let go of the placeholder descriptors for what needs them (a worker start)."""
        for fd in self._placeholders:
            os.close(fd)
        count = len(self._placeholders)
        self._placeholders = []
        try:
            yield
        finally:
            for _ in range(count):
                try:
                    self._placeholders.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    break

    def release(self) -> None:
        for fd in self._placeholders:
            os.close(fd)
        self._placeholders.clear()


def open_fds() -> int:
    """This process's open descriptors now."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError as exc:                 # out of descriptors: no room; no /proc: a guess
        return UNLIMITED if exc.errno == errno.EMFILE else 64
