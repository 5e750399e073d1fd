"""The executor's notes per time slice (stages.child.BatchNotes), with a fake worker that
records what it sends: "took" before "handed", one message of each per slice at most, no
"took" for ids handed on in the same slice (the "handed" implies it), and notes that free
little of the executor's room held for NOTE_SLICES slices."""

from __future__ import annotations

import time
from types import SimpleNamespace

from pspnet.core import wire
from pspnet.stages.child import (
    FAST_ANSWERS,
    NOTE_SLICES,
    ROOM_SHARE,
    BatchNotes,
    Notes,
)

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
    assert sent[1:] == [wire.Handed(("1", "2"), Q0, took=("3",))]   # one message
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
    assert [type(m) for m in sent[1:]] == [wire.Handed]      # "took" ids ride in it
    assert len(sent[1].took) == 128 // ROOM_SHARE            # "0" left before; "1" handed
    assert batch.due_in() is None
    batch.took(("x",))
    batch.sent = time.monotonic() - NOTE_SLICES * 0.010    # the bound: it leaves
    batch.flush_if_due()
    assert sent[-1] == wire.Took(("x",))


def answers(coalesce_ms: float) -> tuple[Notes, list[wire.Message]]:
    sent: list[wire.Message] = []
    child = SimpleNamespace(cfg=SimpleNamespace(coalesce_ms=coalesce_ms), send=sent.append)
    return Notes(child), sent             # type: ignore[arg-type]


def ok(rid: str) -> wire.Result:
    return wire.Result(rid, 0, wire.OK, f"/{rid}.jpg", stage="postprocess")


def test_a_lone_answer_leaves_at_once_and_a_trickle_waits_one_slice_at_most():
    """A postprocess worker's answers (stages.child.Notes): the first after a quiet slice
    at once (an idle daemon's lone image), one pending at a time within one slice."""
    notes, sent = answers(10.0)
    notes.result(ok("a"))
    notes.flush_if_due()
    assert sent == [ok("a")] and notes.due_in() is None
    notes.sent = time.monotonic() - 0.004          # 4 ms after the last message
    notes.result(ok("b"))
    notes.flush_if_due()
    assert sent == [ok("a")] and 0.0 < notes.due_in() <= 0.006     # the slice's end
    notes.sent = time.monotonic() - 0.011          # the slice is over
    notes.flush_if_due()
    assert sent[1:] == [ok("b")]


def test_answers_that_stream_wait_for_a_batch_of_them_within_their_bound():
    """FAST_ANSWERS or more pending at a slice's end: a batch's outputs finished back to
    back, held up to NOTE_SLICES slices so that one message carries them, never longer."""
    notes, sent = answers(10.0)
    notes.result(ok("0"))
    notes.flush_if_due()                           # after a quiet slice: at once
    notes.sent = time.monotonic() - 0.004          # within the slice, answers stream
    for i in range(1, 1 + FAST_ANSWERS):
        notes.result(ok(str(i)))
        notes.flush_if_due()
    notes.sent = time.monotonic() - 0.011          # the slice is over: still held
    notes.flush_if_due()
    assert len(sent) == 1
    assert 0.0 < notes.due_in() <= NOTE_SLICES * 0.010 - 0.011
    notes.sent = time.monotonic() - NOTE_SLICES * 0.010    # the bound
    notes.flush_if_due()
    assert isinstance(sent[1], wire.Results) and len(sent[1]) == FAST_ANSWERS
