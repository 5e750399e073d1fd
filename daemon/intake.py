"""Watch mode as the daemon's loop sees it: a second door, for files instead of clients.

The loop calls it as it calls the client door (`Clients`): `feed` once per turn turns
ready files into requests to the front, within its share of --max-queue; `answered` takes
each answer whose origin is WATCH. It owns the record of processed files (a line per
answered version; one the disk refuses is kept and written with the next write that
works) and speaks for the watcher (its notices logged, masks it found already written
recorded). The watcher (watch.py) decides which files are ready; this decides what
becomes of them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from pspnet.core import wire
from pspnet.daemon.clients import refusal
from pspnet.daemon.front import Front
from pspnet.daemon.watch import Record, StorageError, Version, Watcher

WATCH = "watch"              # the origin of watched files' requests
SUPERSEDED = "superseded"    # a record's status: the file changed while it was processed
RECORD_RETRY_S = 1.0         # a record that cannot be written is tried again this often


class WatchIntake:
    def __init__(self, folder: Path, out_dir: Path, front: Front, max_queue: int,
                 allow_roots: tuple[Path, ...]) -> None:
        self.folder = folder
        self.front = front
        self.allow_roots = allow_roots
        # at most half of --max-queue: the rest is for clients, so a backlog of files
        # never keeps a client's image out
        self.share = max(1, max_queue // 2)
        self.log = structlog.get_logger().bind(component="supervisor")
        self.record = Record(out_dir)
        self.watcher = Watcher(folder, self.record, out_dir)
        self.pending: dict[str, tuple[str, Version]] = {}   # request id -> file, version
        self.stopped = False
        self._record_retry_at = 0.0

    def start(self) -> None:
        self.watcher.start()
        entries = self.record.entries.values()
        self.log.info("watching", folder=str(self.folder), recorded=len(entries),
                      final=sum(1 for e in entries if e.get("final", True)),
                      torn_lines=self.record.torn, share_of_queue=self.share)

    def stop(self, wait_s: float | None = None) -> None:
        """No more files read (intake closed); answers are still recorded."""
        self.stopped = True
        self.watcher.stop(wait_s)

    def close(self, wait_s: float | None = None) -> None:
        """Stopped, and the record's last lines written (fsync'd)."""
        self.stop(wait_s)
        self.record.close()

    @property
    def problem(self) -> str | None:
        """Why intake cannot go on (its thread died), or None."""
        if self.stopped or self.watcher.alive:
            return None
        return f"the watch thread died: {self.watcher.error or 'no error recorded'}"

    # ---- each turn ------------------------------------------------------------------------

    def feed(self) -> None:
        """Retry the record if due, log and record what the watcher found, and submit the
        files that are ready, as many as the share has room for."""
        if self.stopped:
            return
        if self._record_retry_at and time.monotonic() >= self._record_retry_at:
            self._write(self.record.flush)
        for event, fields in self.watcher.take_notices():
            self.log.warning(event, **fields)
        for name, version, mask in self.watcher.take_recovered():
            self.log.info("mask already written; recorded without redoing it", file=name)
            self._record(name, version=list(version), status=wire.OK, mask=mask,
                         recovered=True, final=True)
        room = self.share - len(self.pending)
        for path, version in self.watcher.take(room) if room > 0 else ():
            problem = refusal(wire.Request(WATCH, str(path)), self.allow_roots)
            if problem is not None:             # e.g. a link out of the allowed roots
                self.log.warning("request failed", path=str(path), stage="front", error=problem)
                self._record(path.name, version=list(version), status=wire.ERROR,
                             error=problem, final=True)
                self.watcher.answered(path.name, version, None)
                continue
            rid = f"watch-{uuid.uuid4().hex[:12]}"
            self.pending[rid] = (path.name, version)
            self.front.submit(wire.Request(rid, str(path)), origin=WATCH)

    def answered(self, result: wire.Result, record: bool = True) -> None:
        """A watched file's answer; into the record unless `record` is false (abandoned at
        shutdown: not recorded, so the next start processes the file)."""
        watched = self.pending.pop(result.id, None)
        if watched is None or not record:
            return
        name, version = watched
        current = self.watcher.answered(name, version, result.cause, result.mask)
        # replaced while in flight: its answer is not the file's (the new version's comes)
        self._record(name, version=list(version), id=result.id,
                     status=result.status if current else SUPERSEDED,
                     mask=result.mask if current else None, error=result.error,
                     cause=result.cause, attempt=result.attempt, final=result.cause is None,
                     size=list(result.size) if result.size and current else None,
                     found=[list(f) for f in result.found] if current else [],
                     model=result.model or None)     # which model made it (a reload)

    # ---- the record -----------------------------------------------------------------------

    def _record(self, name: str, **fields: Any) -> None:
        self._write(lambda: self.record.add(name, **fields))

    def _write(self, write: Callable[[], None]) -> None:
        """A storage failure keeps the lines queued (written with the next write that
        works) and is logged once per episode, not per line."""
        try:
            write()
        except StorageError as exc:
            if not self._record_retry_at:
                self.log.warning("cannot write the watch record; keeping its lines until it "
                                 "can (a kill now would make their images be redone)",
                                 error=str(exc), record=str(self.record.path))
            self._record_retry_at = time.monotonic() + RECORD_RETRY_S
        else:
            if self._record_retry_at:
                self.log.info("the watch record can be written again")
                self._record_retry_at = 0.0
