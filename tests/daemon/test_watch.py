"""The watcher alone (daemon/watch.py), without a daemon: which files it hands out and
when. The daemon-level faults (disk full, folders swapped, kill -9) are in
tests/reliability/test_watch_faults.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from watchdog.events import FileSystemEvent

from pspnet.daemon.watch import SETTLE_S, Record, Watcher, wanted


def settled_takes(watcher: Watcher, want: int, timeout_s: float = 10.0) -> list[Path]:
    """What the watcher hands out, looked at as if SETTLE_S had passed, until `want`."""
    got: list[Path] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got += [path for path, _ in watcher.take(16, time.monotonic() + 2 * SETTLE_S)]
        time.sleep(0.05)
    return got


@pytest.fixture()
def watched(tmp_path: Path):
    made: list[Watcher] = []

    def start(folder: Path) -> Watcher:
        out = tmp_path / "masks"
        out.mkdir(exist_ok=True)
        watcher = Watcher(folder, Record(out), out)
        watcher.start()
        made.append(watcher)
        return watcher

    yield start
    for watcher in made:
        watcher.stop()
        watcher.record.close()


def test_a_linked_folder_gets_the_files_that_land_later(tmp_path, watched):
    """--watch LINK, where LINK -> a folder: inotify gets no events through the link, so
    only the files there at start were ever done. Now the real folder is watched and the
    files keep the path the user gave."""
    real = tmp_path / "real_in"
    real.mkdir()
    link = tmp_path / "in"
    link.symlink_to(real, target_is_directory=True)
    watcher = watched(link)
    assert settled_takes(watcher, 1, timeout_s=0.5) == []
    (real / "a.jpg").write_bytes(b"x")                  # into the real folder
    (link / "b.jpg").write_bytes(b"x")                  # through the link
    got = settled_takes(watcher, 2)
    assert sorted(got) == [link.absolute() / "a.jpg", link.absolute() / "b.jpg"]


class Lost(FileSystemEvent):
    """watchdog 7's EventsLostEvent, as its inotify observer sends it on an overflow."""

    event_type = "events_lost"
    is_directory = True


def test_lost_events_make_the_folder_listed_again(tmp_path, watched):
    """The kernel's inotify queue overflowed (a front starved while thousands of files
    landed): the files whose events were dropped were never done until a restart. Now the
    folder is listed again; files already handed out are not handed out twice."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "old.jpg").write_bytes(b"x")
    os.utime(inbox / "old.jpg", (time.time() - 10, time.time() - 10))
    watcher = watched(inbox)
    assert settled_takes(watcher, 1) == [inbox / "old.jpg"]
    watcher.answered("old.jpg", watcher.inflight["old.jpg"], None)
    (inbox / "new.jpg").write_bytes(b"x")
    time.sleep(0.5)                                     # its event arrives, and is lost:
    while not watcher.events.empty():
        watcher.events.get_nowait()
    assert settled_takes(watcher, 1, timeout_s=0.5) == []
    watcher.handler.dispatch(Lost(str(inbox)))
    assert settled_takes(watcher, 1) == [inbox / "new.jpg"]
    assert settled_takes(watcher, 1, timeout_s=0.5) == []
    assert any("events were lost" in event for event, _ in watcher.take_notices())


@pytest.mark.parametrize(("name", "taken"), [
    ("photo.jpg", True), ("photo.tmpl.jpg", True), ("template.jpg", True),
    ("x.tmp.jpg", False), ("x.TEMP.jpg", False), ("x.jpg.tmp", False), (".x.jpg", False),
    ("x.jpg.part", False), ("~x.jpg", False), ("notes.txt", False)])
def test_which_names_are_taken(name: str, taken: bool) -> None:
    """Temporaries are skipped by their parts (x.tmp.jpg), not by '.tmp' anywhere in the
    name (photo.tmpl.jpg was skipped)."""
    assert wanted(Path("/in") / name) is taken


def test_a_subfolder_is_named_once_and_its_files_are_not_taken(tmp_path, watched):
    """Only the folder's own files are watched: a subfolder there at start, and one moved
    in later, are each named once in the log, not skipped without a word."""
    inbox = tmp_path / "in"
    (inbox / "2026-12").mkdir(parents=True)
    (inbox / "2026-12" / "a.jpg").write_bytes(b"x")
    watcher = watched(inbox)
    album = tmp_path / "album"
    album.mkdir()
    (album / "b.jpg").write_bytes(b"x")
    assert settled_takes(watcher, 1, timeout_s=0.3) == []
    album.rename(inbox / "album")
    (inbox / "c.jpg").write_bytes(b"x")
    assert settled_takes(watcher, 1) == [inbox / "c.jpg"]
    named = [f["subfolder"] for event, f in watcher.take_notices()
             if event.startswith("subfolder not watched")]
    assert sorted(named) == [str(inbox / "2026-12"), str(inbox / "album")]
    assert settled_takes(watcher, 1, timeout_s=0.3) == []
    assert watcher.take_notices() == []
