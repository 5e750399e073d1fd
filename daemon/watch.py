"""Watch mode: images already in a folder and those that land later, each version processed
once, nothing lost when files land in pieces, the folder is swapped or the disk fills.

A file is taken once it is complete: its size and mtime unchanged for SETTLE_S (a file
already older than that at the first look counts as settled). watchdog (inotify) only
wakes the watcher up early; what it decides from is the file itself. A file's version is
(device, inode, size, mtime_ns): a later change (appended, rewritten, renamed over) is a
new version and is processed again, its mask replaced. A mask is kept only if the version
it was made from is still the file's current one when its answer comes: one replaced
while it was being decoded gets its mask removed and the new version processed (never
taken for "already masked").

The record next to the masks (`.pspnet-processed.jsonl`, fsync'd) says, per file, which
version was answered and how; a restart (even after kill -9) neither loses nor redoes a
version. Answers that may change with time are not final: a failure to store the mask
(disk full, quota, read-only, I/O error) is retried once a probe write in the mask folder
succeeds again (every RETRY_S, at most), and an input that looked unfinished (empty,
truncated) when the file changes; both again at the next start. A torn last line (the
disk filled mid-write, a kill -9) cannot hide the next entry: a line always starts on a
line of its own.

Intake is lazy and bounded: the start-up listing is read as room allows, never all at
once, and the caller takes at most what it has room for (`take(n)`). If the folder is
deleted or replaced, the watcher says so once and picks the new folder up when it is back;
so too when it is removed and made again at once, under the same inode or not (inotify's
watch on it ended: the folder is watched again, with a log line).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from pspnet.core import wire
from pspnet.core.config import IMAGE_SUFFIXES
from pspnet.model.masks import is_storage_error, mask_path, mask_source, recorded_source

RECORD_NAME = ".pspnet-processed.jsonl"
SETTLE_S = 1.0               # size and mtime unchanged this long: the file is complete
RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)   # storage failures: probe again after these
OBSERVER_JOIN_S = 5.0        # the watchdog thread's end, at most (stop: the caller's bound)

Version = tuple[int, int, int, int]      # device, inode, size, mtime in ns
TEMPORARY_PARTS = frozenset({"tmp", "temp"})   # x.tmp.jpg, x.temp.jpg: not photo.tmpl.jpg


def wanted(path: Path) -> bool:
    """Images only; no hidden files and no temporaries (a producer's write-then-rename)."""
    name = path.name
    return (not name.startswith(".") and not name.startswith("~") and not name.endswith("~")
            and path.suffix.lower() in IMAGE_SUFFIXES and not name.endswith(".part")
            and not TEMPORARY_PARTS.intersection(name.lower().split(".")[1:]))


def version_of(path: Path) -> tuple[Version, float] | None:
    """(version, mtime in s) of a regular file (links followed); None if it is not one."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not (st.st_mode & 0o170000) == 0o100000:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), st.st_mtime


def current_mask(out_dir: Path, image: Path, version: Version) -> str | None:
    """The mask already written for this version of `image` (it records the image as its
    source and is newer), or None. A kill -9 between writing a mask and recording its
    answer leaves such a mask: the image need not be done again."""
    try:
        target = mask_path(out_dir, str(image))
        st = os.stat(target, follow_symlinks=False)
    except (OSError, ValueError):
        return None
    if st.st_mtime_ns < version[3] or recorded_source(target) != mask_source(image):
        return None
    return str(target)


class StorageError(OSError):
    """A storage failure the daemon outlives (disk full, quota, read-only, I/O error)."""


class Record:
    """Append-only JSON lines, one per answered version, fsync'd so kill -9 keeps it.

    What cannot be written (disk full) waits in memory and goes out with the next write
    that works; entries of the same name later in the file win."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / RECORD_NAME
        self.entries: dict[str, dict[str, Any]] = {}
        self.torn = 0                               # lines that were not whole
        self._unwritten: list[str] = []
        self._fresh_line = True                     # the file ends with a newline
        if self.path.exists():
            data = self.path.read_bytes()
            for line in data.decode(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["name"]] = entry
                except (ValueError, KeyError, TypeError):
                    self.torn += 1                  # a torn line after a crash or ENOSPC
            self._fresh_line = not data or data.endswith(b"\n")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                           0o644)

    def done(self, name: str, version: Version | None) -> bool:
        """This version of `name` was answered for good (not to be retried)."""
        entry = self.entries.get(name)
        return (entry is not None and entry.get("final", True)
                and (version is None or tuple(entry.get("version") or ()) == version))

    def add(self, name: str, **fields: Any) -> None:
        """Record an answer; raises StorageError if it could not be written yet (it stays
        queued and is written with the next write that works)."""
        entry = {"name": name, **fields}
        self.entries[name] = entry
        self._unwritten.append(json.dumps(entry) + "\n")
        self.flush()

    @property
    def pending_writes(self) -> int:
        return len(self._unwritten)

    def flush(self) -> None:
        if not self._unwritten:
            return
        text = ("" if self._fresh_line else "\n") + "".join(self._unwritten)
        data = text.encode()
        try:
            written = os.write(self._fd, data)
            if written < len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(self._fd)
        except OSError as exc:
            self._fresh_line = False                # a part may have gone out
            if is_storage_error(exc):
                raise StorageError(exc.errno, f"{self.path}: {exc.strerror}") from None
            raise
        self._fresh_line = True
        self._unwritten.clear()

    def close(self) -> None:
        try:
            self.flush()
        except OSError:
            pass
        os.close(self._fd)


def storage_works(folder: Path) -> bool:
    """A probe: can a small file be written and synced in `folder` again?"""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".pspnet-probe-") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        return False
    return True


class StorageRetry:
    """Watched images whose masks could not be stored, and when to look again: a probe
    write in the mask folder on a bounded back-off (RETRY_S), so a full disk costs a
    write every 30 s at most, not one per image."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.waiting: dict[str, Version] = {}     # name -> the version that failed
        self.retry_at = 0.0
        self.retry_step = 0

    def due(self, now: float) -> list[str]:
        """The names to take again once the storage works (each given once); else []."""
        if not self.waiting or now < self.retry_at:
            return []
        if not storage_works(self.out_dir):
            self.retry_at = now + RETRY_S[min(self.retry_step, len(RETRY_S) - 1)]
            self.retry_step += 1
            return []
        self.retry_step, self.retry_at = 0, 0.0
        names, self.waiting = list(self.waiting), {}
        return names


class _Events(FileSystemEventHandler):
    """Runs on watchdog's thread: only queues names. Its errors are kept (the front's loop
    logs them and stops when the thread dies), never lost in that thread."""

    def __init__(self, sink: queue.SimpleQueue, folder: Path) -> None:
        self.sink = sink
        self.folder = os.fsencode(folder)           # as watched: the real path
        self.error: str | None = None
        self.folder_deleted = threading.Event()     # inotify's watch on it has ended
        self.events_lost = threading.Event()        # the kernel's queue overflowed

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            if event.event_type == "events_lost":   # watchdog 7+ says so; the folder is
                self.events_lost.set()              # listed again (Watcher.take)
            elif event.is_directory and event.event_type == "deleted" \
                    and os.fsencode(event.src_path) == self.folder:
                self.folder_deleted.set()
            elif not event.is_directory or event.event_type in ("created", "moved"):
                self.sink.put(os.fsdecode(getattr(event, "dest_path", "") or event.src_path))
                if event.event_type == "moved":
                    self.sink.put(os.fsdecode(event.src_path))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            raise


@dataclass
class Seen:
    """A file not yet taken: the version last seen, and since when it has not changed."""

    version: Version
    since: float


class Watcher:
    """Complete, unprocessed versions of images in `folder`, handed out `take(n)` at a
    time. The caller reports each outcome with `answered`."""

    def __init__(self, folder: Path, record: Record, out_dir: Path) -> None:
        self.folder = folder.absolute()
        self.real = self.folder                 # what inotify watches: set by _attach (a
        self.record = record                    # link to a folder gets no events)
        self.out_dir = out_dir
        self.events: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.handler = _Events(self.events, self.folder)
        self.observer: Any = None
        self.folder_id: tuple[int, int] | None = None
        self.missing_since: float | None = None
        self.scan: Iterator[os.DirEntry[str]] | None = None
        self.seen: dict[str, Seen] = {}            # names waiting to settle or for room
        self.inflight: dict[str, Version] = {}     # name -> version being processed
        self.tried: dict[str, Version] = {}        # name -> version answered this session
        self.again: set[str] = set()               # take even if tried (storage retry)
        self.recovered: list[tuple[str, Version, str]] = []   # masked, not recorded: record
        self.storage = StorageRetry(out_dir)     # masks that could not be stored
        self.notices: list[tuple[str, dict[str, Any]]] = []   # (event, fields) to log
        self.subfolders: set[str] = set()          # named in the log once: not watched

    # ---- start, stop, health -----------------------------------------------------------

    def start(self) -> None:
        """Watch, then list what is there (lazily): nothing falls between the two. Every
        name the record holds as not final is looked at again (the next start retries)."""
        self._attach()

    def _attach(self) -> None:
        """Watch the folder's real path (the folder may be a link, retargeted since), then
        list it through the name given: images keep the paths the user sees."""
        self.handler.folder_deleted.clear()
        self.real = Path(os.path.realpath(self.folder))
        self.handler.folder = os.fsencode(self.real)
        self.observer = Observer()
        self.observer.schedule(self.handler, str(self.real), recursive=False)
        self.observer.start()
        st = os.stat(self.folder)
        self.folder_id = (st.st_dev, st.st_ino)
        self.scan = os.scandir(self.folder)

    def _detach(self, wait_s: float = OBSERVER_JOIN_S) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=wait_s)
            self.observer = None
        self.scan = None

    @property
    def alive(self) -> bool:
        """The observer thread runs (or is down only because the folder is gone)."""
        if self.observer is None:
            return self.missing_since is not None
        return self.observer.is_alive()

    @property
    def error(self) -> str | None:
        return self.handler.error

    def stop(self, wait_s: float | None = None) -> None:
        """Stop watching; wait at most `wait_s` for watchdog's thread to end."""
        self._detach(OBSERVER_JOIN_S if wait_s is None else wait_s)

    def take_notices(self) -> list[tuple[str, dict[str, Any]]]:
        """What happened to the folder or the storage since the last call, to be logged."""
        notices, self.notices = self.notices, []
        return notices

    def take_recovered(self) -> list[tuple[str, Version, str]]:
        """(name, version, mask) of versions whose mask was found already written (a kill
        between the mask and its record line), to be recorded without redoing them."""
        recovered, self.recovered = self.recovered, []
        return recovered

    def check_folder(self, now: float) -> None:
        """The folder deleted or replaced: say so once, watch the new one when it is back."""
        try:
            st = os.stat(self.folder)
            current = (st.st_dev, st.st_ino) if os.path.isdir(self.folder) else None
        except OSError:
            current = None
        lost = self.handler.folder_deleted.is_set() or not self._emitting()
        if current == self.folder_id and self.missing_since is None and not lost:
            return
        if current is None:
            if self.missing_since is None:
                self.missing_since = now
                self._detach()
                self.notices.append(("watched folder gone; waiting for it to come back",
                                     {"folder": str(self.folder)}))
            return
        before = self.folder_id
        self._detach()
        self._attach()
        if self.missing_since is None:          # removed and made again between two looks
            self.notices.append(("watched folder made again; watching it again",
                                 {"folder": str(self.folder),
                                  "same_inode": before == current}))
        else:
            self.notices.append(("watched folder back; watching it again",
                                 {"folder": str(self.folder),
                                  "gone_s": round(now - self.missing_since, 1)}))
        self.missing_since = None

    def _emitting(self) -> bool:
        """inotify's watch on the folder still runs (it ends when the folder is deleted)."""
        if self.observer is None:
            return True
        return all(emitter.is_alive() for emitter in self.observer.emitters)

    # ---- intake ------------------------------------------------------------------------

    def take(self, room: int, now: float | None = None) -> list[tuple[Path, Version]]:
        """Up to `room` complete versions not processed yet."""
        now = time.monotonic() if now is None else now
        self.check_folder(now)
        if self.handler.events_lost.is_set() and self.observer is not None:
            self.handler.events_lost.clear()    # what landed meanwhile is in the folder:
            self.scan = os.scandir(self.folder)  # list it again (done versions are skipped)
            self.notices.append(("file events were lost (the kernel's inotify queue "
                                 "overflowed); listing the watched folder again",
                                 {"folder": str(self.folder)}))
        self._drain_events(now)
        self._retry_storage(now)
        ready: list[tuple[Path, Version]] = []
        for name in list(self.seen):
            if len(ready) >= room:
                return ready
            self._consider(name, now, ready)
        while self.scan is not None and len(ready) < room:
            entry = next(self.scan, None)
            if entry is None:
                self.scan = None
                break
            if entry.name not in self.seen and entry.name not in self.inflight:
                self._note(entry.name, now, fresh=True)
                if entry.name in self.seen:     # an image file (not hidden, temporary)
                    self._consider(entry.name, now, ready)
        return ready

    def _drain_events(self, now: float) -> None:
        while True:
            try:
                raw = self.events.get_nowait()
            except queue.Empty:
                return
            path = Path(raw)
            if path.parent in (self.real, self.folder):
                self._note(path.name, now, fresh=False)

    def _note(self, name: str, now: float, fresh: bool) -> None:
        """A name to look at: remember its version and since when it is unchanged. A file
        first met in the start-up listing whose mtime is already SETTLE_S old is settled."""
        path = self.folder / name
        if not wanted(path):
            if name not in self.subfolders and not name.startswith(".") and path.is_dir():
                self.subfolders.add(name)
                self.notices.append(("subfolder not watched: watch mode takes the "
                                     "folder's own files (pspnet submit -r takes a tree)",
                                     {"subfolder": str(path)}))
            return
        found = version_of(path)
        if found is None:
            self.seen.pop(name, None)
            return
        version, mtime = found
        old = self.seen.get(name)
        if old is not None and old.version == version:
            return
        since = now
        if fresh and time.time() - mtime >= SETTLE_S:
            since = now - SETTLE_S
        self.seen[name] = Seen(version, since)

    def _consider(self, name: str, now: float, ready: list[tuple[Path, Version]]) -> None:
        seen = self.seen[name]
        path = self.folder / name
        found = version_of(path)
        if found is None:                       # gone before it settled
            del self.seen[name]
            return
        if found[0] != seen.version:            # still changing
            self.seen[name] = Seen(found[0], now)
            return
        if now - seen.since < SETTLE_S or name in self.inflight:
            return
        del self.seen[name]
        again = name in self.again
        self.again.discard(name)
        if not again and (self.record.done(name, seen.version)
                          or self.tried.get(name) == seen.version):
            return
        mask = None if again else current_mask(self.out_dir, path, seen.version)
        if mask is not None:                    # answered, but the record missed it
            self.tried[name] = seen.version
            self.recovered.append((name, seen.version, mask))
            return
        self.inflight[name] = seen.version
        ready.append((path, seen.version))

    def answered(self, name: str, version: Version, cause: str | None,
                 mask: str | None = None) -> bool:
        """An outcome came back. A storage failure waits for the storage to work again; an
        unfinished-looking input waits for the file to change (a new version). False when
        the file changed while it was in flight: its mask (made from a version that is no
        longer the file) is removed, and the new version is processed."""
        self.inflight.pop(name, None)
        self.tried[name] = version
        if cause == wire.STORAGE:
            self.storage.waiting[name] = version
        found = version_of(self.folder / name)
        if found is None or found[0] == version:
            return True
        # a change that came while it was in flight was deferred: take it now, as itself
        self._note(name, time.monotonic(), fresh=False)
        self.again.add(name)                      # its mask is not the new version's
        if mask is not None:
            with contextlib.suppress(OSError):
                if recorded_source(Path(mask)) == mask_source(self.folder / name):
                    os.unlink(mask)
        self.notices.append(("watched file changed while it was processed; its mask "
                             "removed, the new version taken", {"file": name}))
        return False

    def _retry_storage(self, now: float) -> None:
        """Once the mask folder takes a write again, every storage failure is looked at
        again (its file as it is now)."""
        names = self.storage.due(now)
        if not names:
            return
        self.notices.append(("storage works again; retrying", {"images": len(names)}))
        for name in names:
            found = version_of(self.folder / name)
            if found is not None:
                self.seen[name] = Seen(found[0], now - SETTLE_S)
                self.again.add(name)

    @property
    def backlog(self) -> int:
        """Known names not yet handed out (the unread part of the listing not included)."""
        return len(self.seen)
