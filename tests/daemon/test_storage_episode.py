"""Storage episodes alone: the lines a filling, flapping and freed disk gives in the log."""

from __future__ import annotations

from pspnet.core import wire
from pspnet.daemon.storage import StorageEpisode


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def warning(self, event: str, **kw: object) -> None:
        self.lines.append(("warning", event, kw))

    def info(self, event: str, **kw: object) -> None:
        self.lines.append(("info", event, kw))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stored(n: int) -> wire.Result:
    return wire.Result(id=str(n), attempt=0, status=wire.OK, mask=f"/m/{n}.png")


def not_stored(n: int) -> wire.Result:
    return wire.Result(id=str(n), attempt=0, status=wire.ERROR, error="No space left",
                       cause=wire.STORAGE)


def test_a_flapping_disk_is_one_episode_with_one_warning_and_one_end():
    """Nearly full: every other mask fits. One warning, no end while failures go on; the
    end comes after CALM_MASKS stored in a row, with the count of failures."""
    log, clock = Log(), Clock()
    episode = StorageEpisode(log, clock=clock, calm_s=2.0, calm_masks=8)
    for n in range(40):
        clock.now += 0.01
        episode.saw(not_stored(n) if n % 2 else stored(n))
    assert [line[:2] for line in log.lines] == [
        ("warning", "masks cannot be stored; answering them as errors until they can")]
    for n in range(40, 47):
        episode.saw(stored(n))
    assert len(log.lines) == 1                            # 7 in a row, 0.0 s: not yet
    episode.saw(stored(47))
    assert log.lines[-1] == ("info", "masks are stored again", {"failed_meanwhile": 20})
    episode.saw(not_stored(48))                           # a new episode, a new warning
    assert [line[0] for line in log.lines] == ["warning", "info", "warning"]


def test_an_episode_ends_on_a_stored_mask_after_a_calm_while():
    log, clock = Log(), Clock()
    episode = StorageEpisode(log, clock=clock, calm_s=2.0, calm_masks=8)
    episode.saw(not_stored(1))
    clock.now += 1.0
    episode.saw(stored(2))
    assert len(log.lines) == 1
    clock.now += 1.5
    episode.saw(stored(3))
    assert log.lines[-1] == ("info", "masks are stored again", {"failed_meanwhile": 1})


def test_other_answers_neither_start_nor_end_an_episode():
    log = Log()
    episode = StorageEpisode(log, clock=Clock())
    episode.saw(stored(1))
    episode.saw(wire.Result(id="2", attempt=0, status=wire.ERROR, error="not a JPEG"))
    assert log.lines == []
