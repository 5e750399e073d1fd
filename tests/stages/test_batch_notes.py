"""The executor's notes per time slice (stages.child.BatchNotes), with a fake worker that
records what it sends: "took" before "handed", one message of each per slice at most, no
"took" for ids handed on in the same slice (the "handed" implies it), and notes that free
little of the executor's room held for NOTE_SLICES slices."""

from __future__ import annotations

import time
from types import SimpleNamespace

from pspnet.core import wire
from pspnet.stages.child import NOTE_SLICES, ROOM_SHARE, BatchNotes

Q0 = "postprocess-0-300"


def notes(coalesce_ms: float, capacity: int = 8) -> tuple[BatchNotes, list[wire.Message]]:
    sent: list[wire.Message] = []
    child = SimpleNamespace(cfg=SimpleNamespace(coalesce_ms=coalesce_ms), send=sent.append,
                            capacity=capacity)
    return BatchNotes(child), sent        # type: ignore[arg-type]


def test_the_first_note_after_a_quiet_slice_leaves_at_once():
    batch, sent = notes(1000.0)
    batch.took(("1", "2"))
    assert sent == [wire.Took(("1", "2"))]


def test_ids_taken_and_handed_in_one_slice_go_in_the_handed_note_alone():
    batch, sent = notes(1000.0)
    batch.took(("1",))                           # leaves at once: the slice was quiet
    batch.took(("2", "3"))                       # the slice is not over: held
    batch.handed(("1", "2"), Q0)
    assert sent == [wire.Took(("1",))]
    batch.sent = -1e9                            # the slice is over
    batch.flush_if_due()
    assert sent[1:] == [wire.Took(("3",)), wire.Handed(("1", "2"), Q0)]
    assert batch.due_in() is None


def test_without_coalescing_every_note_leaves_as_it_comes():
    batch, sent = notes(0.0)
    batch.took(("1",))
    batch.handed(("1",), Q0)
    assert sent == [wire.Took(("1",)), wire.Handed(("1",), Q0)]


def test_notes_that_free_little_room_wait_longer_and_never_past_their_bound():
    """Capacity 128 (two batches of 64): a note or two frees little of it, so they wait up
    to NOTE_SLICES slices; a quarter of the room pending leaves after one slice."""
    batch, sent = notes(10.0, capacity=128)
    batch.took(("0",))                           # after a quiet slice: at once
    batch.sent = time.monotonic() - 0.015        # one and a half slices ago
    batch.took(("1",))
    batch.handed(("1",), Q0)
    assert len(sent) == 1
    assert 0.0 < batch.due_in() <= NOTE_SLICES * 0.010 - 0.015
    batch.took(tuple(str(i) for i in range(2, 128 // ROOM_SHARE + 2)))   # a quarter
    assert [type(m) for m in sent[1:]] == [wire.Took, wire.Handed]
    assert batch.due_in() is None
    batch.took(("x",))
    batch.sent = time.monotonic() - NOTE_SLICES * 0.010    # the bound: it leaves
    batch.flush_if_due()
    assert sent[-1] == wire.Took(("x",))
