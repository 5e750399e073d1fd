"""The request ledger alone: pure logic, no processes, sockets or monkeypatching.

Each test walks requests through the moves the front hears of (dispatch, "handed",
"took", answers, a worker's death) and checks where they are, whose room they take, and
what a death retries or gives up. Worker names are as the workers call themselves.
"""

from __future__ import annotations

import itertools

import pytest

from pspnet.daemon.ledger import (
    EXECUTOR,
    PREPROCESS,
    QUEUED,
    RETRIES,
    TO_EXECUTOR,
    TO_POSTPROCESS,
    Ledger,
)

P0, P1 = "preprocess-0-100", "preprocess-1-101"
E0, E1 = "executor-0-200", "executor-1-201"
Q0, Q1 = "postprocess-0-300", "postprocess-1-301"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(clock: Clock) -> Ledger:
    return Ledger(clock=clock)


def accept(ledger: Ledger, n: int, origin: object = "client-a") -> list[str]:
    return [ledger.add(f"c{i}", f"/img/{i}.jpg", None, origin).rid for i in range(n)]


def dispatch(ledger: Ledger, preprocess: str, executor: str) -> str:
    (entry,) = ledger.next_group(1)
    ledger.dispatched([entry], preprocess, executor)
    return entry.rid


def dispatch_group(ledger: Ledger, n: int, preprocess: str, executor: str) -> list[str]:
    entries = ledger.next_group(n)
    ledger.dispatched(entries, preprocess, executor)
    return [e.rid for e in entries]


def test_a_request_walks_every_state_and_rooms_are_taken_and_freed(ledger):
    (rid,) = accept(ledger, 1)
    entry = ledger.entries[rid]
    assert entry.state == QUEUED and ledger.inflight == 0 and not ledger.load
    dispatch(ledger, P0, E0)
    assert (entry.state, entry.holders) == (PREPROCESS, (P0, E0))
    assert ledger.load == {P0: 1, E0: 1}          # decoding at P0, bound for E0's room
    ledger.handed(P0, [rid], E0)
    assert (entry.state, entry.holders) == (TO_EXECUTOR, (P0, E0))
    assert ledger.load == {E0: 1}                 # P0 is free; E0's room still taken
    ledger.took(E0, [rid])
    assert (entry.state, entry.holders) == (EXECUTOR, (E0,))
    assert not ledger.load                        # in a batch: E0's room is free again
    ledger.handed(E0, [rid], Q1)
    assert (entry.state, entry.holders) == (TO_POSTPROCESS, (E0, Q1))
    answered = ledger.answer(rid)
    assert answered is entry and ledger.pending == 0 and not ledger.load
    assert ledger.answer(rid) is None, "a second answer is dropped"


def test_notes_that_overtake_each_other_still_land_right(ledger):
    """The executor's "took" and "handed" leave in order on its one socket; the preprocess
    worker's "handed" on another may come before, between or after them: each order at
    the front ends in the same state."""
    orders = [o for o in itertools.permutations(["p-handed", "e-took", "e-handed"])
              if o.index("e-took") < o.index("e-handed")]
    assert len(orders) == 3
    for order in orders:
        ledger = Ledger()
        (rid,) = accept(ledger, 1)
        dispatch(ledger, P0, E0)
        for note in order:
            if note == "p-handed":
                ledger.handed(P0, [rid], E0)
            elif note == "e-took":
                ledger.took(E0, [rid])
            else:
                ledger.handed(E0, [rid], Q0)
        entry = ledger.entries[rid]
        assert (entry.state, entry.holders) == (TO_POSTPROCESS, (E0, Q0)), order
        assert not ledger.load, order


@pytest.mark.parametrize("victim, state_before", [
    (P0, PREPROCESS), (E0, PREPROCESS),           # decoding; or its executor died
    (P0, TO_EXECUTOR), (E0, TO_EXECUTOR),         # sent, still in the sender's queue?
    (E0, EXECUTOR),                               # in a batch
    (E0, TO_POSTPROCESS), (Q0, TO_POSTPROCESS),   # sent on to postprocess
])
def test_a_holders_death_retries_what_it_could_have_lost(ledger, victim, state_before):
    (rid,) = accept(ledger, 1)
    dispatch(ledger, P0, E0)
    moves = {TO_EXECUTOR: [lambda: ledger.handed(P0, [rid], E0)],
             EXECUTOR: [lambda: ledger.took(E0, [rid])],
             TO_POSTPROCESS: [lambda: ledger.took(E0, [rid]),
                              lambda: ledger.handed(E0, [rid], Q0)]}
    for move in moves.get(state_before, []):
        move()
    assert ledger.entries[rid].state == state_before
    retried, given_up = ledger.lost(victim)
    assert [e.rid for e in retried] == [rid] and given_up == []
    entry = ledger.entries[rid]
    assert (entry.state, entry.holders, entry.request.attempt) == (QUEUED, (), 1)
    assert ledger.queue[0] == rid and not ledger.load


def test_a_death_does_not_touch_what_others_hold(ledger):
    rids = accept(ledger, 3)
    dispatch(ledger, P0, E0)
    dispatch(ledger, P1, E1)
    ledger.took(E0, [rids[0]])
    ledger.handed(P1, [rids[1]], E1)
    ledger.took(E1, [rids[1]])
    ledger.handed(E1, [rids[1]], Q1)
    assert ledger.lost(P0) == ([], [])            # rid 0 is past P0: E0 holds it alone
    assert ledger.lost(Q0) == ([], [])
    assert ledger.lost("postprocess-1-999") == ([], [])   # another life of Q1's slot
    assert ledger.entries[rids[0]].state == EXECUTOR
    assert ledger.entries[rids[2]].state == QUEUED


def test_retried_once_then_answered_as_given_up(ledger):
    (rid,) = accept(ledger, 1)
    for attempt in range(RETRIES):
        dispatch(ledger, P0, E0)
        retried, given_up = ledger.lost(E0)
        assert [e.rid for e in retried] == [rid] and not given_up
        assert ledger.entries[rid].request.attempt == attempt + 1
    dispatch(ledger, P0, E0)
    retried, given_up = ledger.lost(E0)
    assert not retried and [e.rid for e in given_up] == [rid]
    assert ledger.pending == 0 and not ledger.queue and not ledger.load
    assert ledger.answer(rid) is None, "given up is answered: nothing later may answer it"


def test_an_answer_of_an_earlier_attempt_still_answers(ledger):
    """The first answer wins, whichever attempt it comes from: a worker that was only
    suspected (it died after passing the request on) may still deliver."""
    (rid,) = accept(ledger, 1)
    dispatch(ledger, P0, E0)
    ledger.handed(P0, [rid], E0)
    ledger.lost(P0)                               # sender died: retried, attempt 1
    assert ledger.answer(rid) is not None         # ...but E0 had it and answered
    assert ledger.pending == 0


def test_notes_from_a_worker_that_does_not_hold_a_request_are_ignored(ledger):
    (rid,) = accept(ledger, 1)
    dispatch(ledger, P0, E0)
    ledger.took(E1, [rid])                        # another executor: a stale queue
    ledger.handed(P1, [rid], E0)
    ledger.handed(E1, [rid], Q0)
    ledger.took(E0, ["no-such-id"])
    entry = ledger.entries[rid]
    assert (entry.state, entry.holders) == (PREPROCESS, (P0, E0))


def test_stalled_requests_are_retried_and_the_queue_is_not(ledger, clock):
    rids = accept(ledger, 3)
    dispatch(ledger, P0, E0)
    clock.now += 100
    dispatch(ledger, P1, E0)
    clock.now += 550
    retried, given_up = ledger.stalled(600.0)
    assert [e.rid for e in retried] == [rids[0]] and not given_up
    assert ledger.entries[rids[1]].state == PREPROCESS
    assert ledger.entries[rids[2]].state == QUEUED


def test_one_client_id_is_one_request_while_pending(ledger):
    (rid,) = accept(ledger, 1, origin="client-a")
    assert ledger.find("client-a", "c0").rid == rid
    assert ledger.find("client-b", "c0") is None  # ids are per client
    other = ledger.add("c0", "/img/other.jpg", None, "client-b")
    assert other.rid != rid and ledger.pending == 2
    ledger.answer(rid)
    assert ledger.find("client-a", "c0") is None  # answered: the id is free again


def test_abandon_empties_everything(ledger):
    accept(ledger, 4)
    dispatch(ledger, P0, E0)
    entries = ledger.abandon()
    assert len(entries) == 4 and ledger.pending == 0 and not ledger.queue and not ledger.load


def test_counts_by_state(ledger):
    rids = accept(ledger, 3)
    dispatch(ledger, P0, E0)
    ledger.took(E0, [rids[0]])
    assert ledger.by_state() == {QUEUED: 2, PREPROCESS: 0, TO_EXECUTOR: 0, EXECUTOR: 1,
                                 TO_POSTPROCESS: 0}


def test_a_group_note_moves_every_id_its_sender_holds_at_once(ledger):
    """Control per batch: one dispatch, one "handed", one "took" for a group."""
    accept(ledger, 6)
    rids = dispatch_group(ledger, 6, P0, E0)
    assert [ledger.entries[r].state for r in rids] == [PREPROCESS] * 6
    assert ledger.load == {P0: 6, E0: 6}
    ledger.handed(P0, rids[:4], E0)              # a time slice of the group
    assert ledger.load == {P0: 2, E0: 6}
    ledger.took(E0, rids)                        # the executor took all six: two before
    assert not ledger.load                       # their preprocess note came
    ledger.handed(P0, rids[4:], E0)              # that late note is passed over
    assert {ledger.entries[r].state for r in rids} == {EXECUTOR}
    ledger.handed(E0, rids[:3], Q0)
    ledger.handed(E0, rids[3:], Q1)
    assert [ledger.entries[r].holders for r in rids] == [(E0, Q0)] * 3 + [(E0, Q1)] * 3


def test_a_group_split_by_a_death_retries_exactly_what_the_dead_worker_held(ledger):
    accept(ledger, 8)
    rids = dispatch_group(ledger, 8, P0, E0)
    ledger.handed(P0, rids[:5], E0)
    ledger.took(E0, rids[:5])                    # five in a batch, three still decoding
    ledger.handed(E0, rids[:2], Q0)              # two of the batch at Q0, three at Q1
    ledger.handed(E0, rids[2:5], Q1)
    retried, given_up = ledger.lost(P0)
    assert [e.rid for e in retried] == rids[5:] and not given_up
    retried, given_up = ledger.lost(Q1)
    assert [e.rid for e in retried] == rids[2:5] and not given_up
    assert [ledger.entries[r].state for r in rids[:2]] == [TO_POSTPROCESS] * 2
    assert sorted(ledger.queue) == sorted(rids[2:])
    assert not ledger.load


def test_a_note_for_ids_already_retried_moves_nothing(ledger):
    """A dead worker's group note still in flight (or one of its previous life) arrives
    after the front retried its ids: they stay queued, and a later answer of the old
    attempt still answers once."""
    accept(ledger, 4)
    rids = dispatch_group(ledger, 4, P0, E0)
    retried, _ = ledger.lost(P0)
    assert len(retried) == 4
    ledger.handed(P0, rids, E0)
    ledger.took(E0, rids)
    ledger.handed(E0, rids, Q0)
    assert [ledger.entries[r].state for r in rids] == [QUEUED] * 4
    assert list(ledger.queue) == rids and not ledger.load
    again = dispatch_group(ledger, 4, P1, E1)    # the retry goes elsewhere
    ledger.took(E0, again)                       # the dead group's executor: not its room
    assert [ledger.entries[r].holders for r in again] == [(P1, E1)] * 4
    assert ledger.answer(rids[0]) is not None and ledger.answer(rids[0]) is None
    assert ledger.pending == 3


def test_an_executors_handed_note_implies_its_took(ledger):
    """An executor that takes and hands on ids in one time slice sends only "handed"
    (stages.child.BatchNotes): the ledger moves them both steps, frees the executor's
    room, and a late "took" or another executor's note moves nothing."""
    accept(ledger, 6)
    rids = dispatch_group(ledger, 6, P0, E0)
    ledger.handed(P0, rids[:3], E0)              # three on their way, three decoding
    ledger.handed(E1, rids, Q0)                  # not their executor: passed over
    assert [ledger.entries[r].state for r in rids] == [TO_EXECUTOR] * 3 + [PREPROCESS] * 3
    ledger.handed(E0, rids[:4], Q0)              # took and handed in one slice
    assert [ledger.entries[r].state for r in rids] == [TO_POSTPROCESS] * 4 + [PREPROCESS] * 2
    assert [ledger.entries[r].holders for r in rids[:4]] == [(E0, Q0)] * 4
    assert ledger.load == {P0: 2, E0: 2}         # the four no longer take room
    ledger.took(E0, rids[:4])                    # late: passed over
    ledger.handed(P0, rids[3:4], E0)             # the preprocess note, late: passed over
    assert [ledger.entries[r].state for r in rids[:4]] == [TO_POSTPROCESS] * 4
    retried, given_up = ledger.lost(E0)          # the executor dies: all six were its
    assert sorted(e.rid for e in retried) == sorted(rids) and not given_up
    assert not ledger.load


def test_room_stays_the_sum_of_what_each_request_takes_under_any_order_of_notes(ledger):
    """Notes give room back once per note, not per id (issue 27): whatever order groups of
    notes, repeats, deaths and answers come in, each worker's load is exactly the room its
    requests take (the preprocess worker's until it hands them on, the executor's until it
    takes them), and no worker is left with a zero or negative count."""
    import random

    from pspnet.daemon.ledger import _room_taken

    rng = random.Random(27)
    accept(ledger, 400)
    for _ in range(600):
        move = rng.random()
        if move < 0.25 and ledger.queue:
            dispatch_group(ledger, rng.randint(1, 6), rng.choice((P0, P1)),
                           rng.choice((E0, E1)))
        else:
            rids = rng.sample(sorted(ledger.entries), min(len(ledger.entries), 8))
            if move < 0.45:
                ledger.handed(rng.choice((P0, P1)), rids, rng.choice((E0, E1)))
            elif move < 0.65:
                ledger.took(rng.choice((E0, E1)), rids)
            elif move < 0.85:
                ledger.handed(rng.choice((E0, E1)), rids, rng.choice((Q0, Q1)))
            elif move < 0.97:
                for rid in rids[:3]:
                    ledger.answer(rid)
            else:
                ledger.lost(rng.choice((P0, P1, E0, E1)))
        expected: dict[str, int] = {}
        for entry in ledger.entries.values():
            for worker in _room_taken(entry):
                expected[worker] = expected.get(worker, 0) + 1
        assert dict(ledger.load) == expected
