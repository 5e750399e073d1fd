"""Watch mode: images already in a folder and those that land later, each processed once.

watchdog (inotify on Linux) reports a file when it is closed after writing or renamed into
the folder; a file that only shows up as created is taken once its size stops changing.
What was processed is appended to a record next to the masks, so a restart (even after
kill -9) neither loses nor redoes an image: anything not in the record is (re)submitted.
Errors are recorded too, such as x.png refused because the mask name x.png already holds
the mask of x.jpg (stages.labels.write_mask): renaming the image makes it a new one.
"""

from __future__ import annotations

import json
import os
import queue
import time
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

RECORD_NAME = ".pspnet-processed.jsonl"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
SETTLE_S = 1.0               # a created-but-never-closed file counts once unchanged this long


def wanted(path: Path) -> bool:
    """Images only; no hidden files and no temporaries (a producer's write-then-rename)."""
    name = path.name
    return (not name.startswith(".") and not name.startswith("~") and not name.endswith("~")
            and path.suffix.lower() in IMAGE_SUFFIXES and ".tmp" not in name.lower()
            and not name.endswith(".part"))


class Record:
    """Append-only JSON lines: one per image answered; fsync'd so kill -9 keeps it."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / RECORD_NAME
        self.done: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.done[entry["name"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue                          # a torn last line after a crash
        self._file = open(self.path, "a")            # noqa: SIM115  (held for the daemon's life)

    def add(self, name: str, **fields: Any) -> None:
        entry = {"name": name, **fields}
        self.done[name] = entry
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class _Events(FileSystemEventHandler):
    """Runs on watchdog's thread: only queues what it sees. Its errors are kept (the
    front's loop logs them and stops when the thread dies), never lost in that thread."""

    def __init__(self, sink: queue.SimpleQueue) -> None:
        self.sink = sink
        self.error: str | None = None

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            super().dispatch(event)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            raise

    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.sink.put(("closed", event.src_path))

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.sink.put(("closed", event.dest_path))

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.sink.put(("created", event.src_path))

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.sink.put(("created", event.src_path))


class Watcher:
    """Yields paths of complete images in `folder` that the record does not hold."""

    def __init__(self, folder: Path, record: Record) -> None:
        self.folder = folder
        self.record = record
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.observer = Observer()
        self.handler = _Events(self.events)
        self.observer.schedule(self.handler, str(folder), recursive=False)
        self.settling: dict[Path, tuple[int, float]] = {}   # created, not yet closed
        self.taken: set[str] = set()

    def start(self) -> list[Path]:
        """Start watching, then list what is already there (nothing falls between)."""
        self.observer.start()
        present = sorted(p for p in self.folder.iterdir() if p.is_file())
        return [p for p in present if self._take(p)]

    def poll(self) -> list[Path]:
        ready: list[Path] = []
        while True:
            try:
                kind, raw = self.events.get_nowait()
            except queue.Empty:
                break
            path = Path(os.fsdecode(raw))
            if kind == "closed":
                self.settling.pop(path, None)
                if self._take(path):
                    ready.append(path)
            elif path.name not in self.taken and wanted(path):
                self.settling[path] = (_size(path), time.monotonic())
        now = time.monotonic()
        for path, (size, seen) in list(self.settling.items()):
            current = _size(path)
            if current != size:
                self.settling[path] = (current, now)
            elif now - seen >= SETTLE_S:
                del self.settling[path]
                if self._take(path):
                    ready.append(path)
        return ready

    def _take(self, path: Path) -> bool:
        if not wanted(path) or path.name in self.taken or path.name in self.record.done:
            return False
        if not path.is_file():
            return False
        self.taken.add(path.name)
        return True

    @property
    def alive(self) -> bool:
        """The observer and its emitter threads are running."""
        return self.observer.is_alive() and all(e.is_alive() for e in self.observer.emitters)

    @property
    def error(self) -> str | None:
        return self.handler.error

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1
