"""The request ledger: where each accepted request is, and whose death would lose it.

Pure bookkeeping, no sockets and no processes: the front tells it what it hears, and it
says what to retry and whom each worker's room is taken by. A request moves

    QUEUED -> PREPROCESS -> TO_EXECUTOR -> EXECUTOR -> TO_POSTPROCESS -> answered

and at each step it names its holders, the workers whose death would lose it: the one that
works on it and, while it travels between two workers (sent, not yet taken), both ends,
since its bytes may still sit in the sender's queue when the sender is killed. From
dispatch on it also names the executor whose room it takes. When a holder dies, its
requests are retried once and then answered as errors; the first answer for a request is
its only one.

Control comes per group, not per image: a dispatch, a "handed" or a "took" note lists many
ids, and each moves every listed request its sender still holds at once. Ids the sender no
longer holds (retried after a death, answered, moved on by a faster note) are passed over,
so a late or repeated note cannot move a request backwards. An executor's notes come in
order (one socket: "took" before "handed"), and a "handed" from the executor implies its
"took" (an executor hands on only what it took; it leaves out a "took" for ids it hands
on in the same time slice, so a batch run at once costs one note, not two); a preprocess
worker's "handed" may come after the executor's notes for the same ids, and is then
passed over.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pspnet.core import wire

QUEUED, PREPROCESS, TO_EXECUTOR, EXECUTOR, TO_POSTPROCESS = (
    "queued", "preprocess", "to-executor", "executor", "to-postprocess")
STATES = (QUEUED, PREPROCESS, TO_EXECUTOR, EXECUTOR, TO_POSTPROCESS)
RETRIES = 1


@dataclass
class Entry:
    """One accepted request. `request.id` is the front's own id (unique, short); the
    client's id and who asked (`origin`) are kept for the answer."""

    request: wire.Request
    client_id: str
    origin: Any
    state: str = QUEUED
    holders: tuple[str, ...] = ()       # workers whose death would lose it
    executor: str | None = None         # whose room it takes, from dispatch on
    since: float = 0.0                  # last move (monotonic)
    accepted: float = 0.0
    token: str = ""                     # the current attempt's, as dispatched (core.trust)

    @property
    def rid(self) -> str:
        return self.request.id


@dataclass
class Ledger:
    clock: Callable[[], float] = time.monotonic
    entries: dict[str, Entry] = field(default_factory=dict)
    queue: collections.deque[str] = field(default_factory=collections.deque)
    load: collections.Counter[str] = field(default_factory=collections.Counter)
    retried: int = 0
    _by_client: dict[tuple[Any, str], str] = field(default_factory=dict)
    _next_id: int = 0

    # ---- intake ------------------------------------------------------------------------

    def find(self, origin: Any, client_id: str) -> Entry | None:
        """The pending request this client sent under this id, if any."""
        rid = self._by_client.get((origin, client_id))
        return None if rid is None else self.entries.get(rid)

    def add(self, client_id: str, path: str, ann: str | None, origin: Any,
            upload: wire.Request | None = None) -> Entry:
        """Accept a request (the caller has checked `find` for a repeat). `upload`: the
        client's request whose bytes, want and write it keeps (held until answered: a
        retry dispatches them again)."""
        self._next_id += 1
        rid = format(self._next_id, "x")
        now = self.clock()
        request = wire.Request(rid, path, ann) if upload is None else \
            dataclasses.replace(upload, id=rid, path=path, ann=ann, attempt=0, token="")
        entry = Entry(request, client_id, origin, since=now, accepted=now)
        self.entries[rid] = entry
        self._by_client[(origin, client_id)] = rid
        self.queue.append(rid)
        return entry

    def cancel(self, origin: Any, client_ids: Iterable[str]) -> list[Entry]:
        """This client's requests under these ids that are still queued, removed: never
        dispatched, never answered, their room free. Those already dispatched run on."""
        dropped = []
        for client_id in client_ids:
            entry = self.find(origin, client_id)
            if entry is not None and entry.state == QUEUED:
                del self.entries[entry.rid]
                del self._by_client[(origin, client_id)]
                dropped.append(entry)
        if dropped:
            gone = {e.rid for e in dropped}
            self.queue = collections.deque(rid for rid in self.queue if rid not in gone)
        return dropped

    # ---- moves -------------------------------------------------------------------------

    def next_queued(self) -> Entry | None:
        return self.entries[self.queue[0]] if self.queue else None

    def next_group(self, n: int) -> list[Entry]:
        """The first `n` queued requests (fewer if fewer are queued), still queued."""
        return [self.entries[self.queue[i]] for i in range(min(n, len(self.queue)))]

    def dispatched(self, entries: list[Entry], preprocess: str, executor: str,
                   tokens: Sequence[str] | None = None) -> None:
        """The head of the queue went to `preprocess`, its pixels bound for `executor`.
        `tokens`: the requests' tokens as dispatched, kept so that an answer's token is
        compared with the one handed out, not computed again per answer."""
        now = self.clock()
        holders, load = (preprocess, executor), self.load
        for i, entry in enumerate(entries):
            rid = self.queue.popleft()
            assert rid == entry.rid, "dispatch takes the head of the queue"
            entry.state, entry.holders, entry.executor, entry.since = (
                PREPROCESS, holders, executor, now)   # queued ones take no room: none freed
            if tokens is not None:
                entry.token = tokens[i]
        load[preprocess] += len(entries)
        load[executor] += len(entries)

    def handed(self, worker: str, rids: Iterable[str], to: str) -> None:
        """`worker` sent these requests' data on to `to`. The room each move frees is
        summed over the note and given back once (`_free`)."""
        now, entries, freed = self.clock(), self.entries, collections.Counter[str]()
        for rid in rids:
            entry = entries.get(rid)
            if entry is None or worker not in entry.holders:
                continue
            state, executor = entry.state, entry.executor
            if state == PREPROCESS and entry.holders[0] == worker:
                if executor is None:           # never: dispatch names the executor
                    self._move(entry, TO_EXECUTOR, (worker, to), None, now)
                    continue
                entry.state, entry.holders, entry.since = TO_EXECUTOR, (worker, executor), now
                freed[worker] += 1             # the preprocess worker's room; the
            elif state == EXECUTOR or executor == worker:   # executor's until it takes it
                if state == PREPROCESS:        # an executor hands on only what it took:
                    freed.update(entry.holders)   # its "took" is implied (BatchNotes
                elif state == TO_EXECUTOR:        # leaves it out), and the preprocess
                    freed[worker] += 1            # worker's "handed" may come later
                entry.state, entry.holders, entry.executor, entry.since = (
                    TO_POSTPROCESS, (worker, to), worker, now)
        self._free(freed)

    def took(self, executor: str, rids: Iterable[str]) -> None:
        """`executor` put these requests into a batch: its room is free again."""
        now, entries, freed = self.clock(), self.entries, collections.Counter[str]()
        for rid in rids:
            entry = entries.get(rid)
            if entry is None or entry.executor != executor or executor not in entry.holders:
                continue
            if entry.state == PREPROCESS:
                freed.update(entry.holders)
            elif entry.state == TO_EXECUTOR:
                freed[executor] += 1
            else:
                continue
            entry.state, entry.holders, entry.since = EXECUTOR, (executor,), now
        self._free(freed)

    def answer(self, rid: str) -> Entry | None:
        """The request answered: removed. None when it was answered already (or unknown):
        the first answer wins, later ones are dropped."""
        entry = self.entries.pop(rid, None)
        if entry is None:
            return None
        self._unload(entry)
        if entry.state == QUEUED:
            self.queue.remove(rid)
        self._by_client.pop((entry.origin, entry.client_id), None)
        return entry

    # ---- losses ------------------------------------------------------------------------

    def lost(self, worker: str) -> tuple[list[Entry], list[Entry]]:
        """`worker` died: (retried, given up). Given-up entries are removed; the caller
        answers them with an error."""
        return self._retry([e for e in self.entries.values() if worker in e.holders])

    def stalled(self, timeout_s: float) -> tuple[list[Entry], list[Entry]]:
        """Requests out of the queue that have not moved for `timeout_s`."""
        limit = self.clock() - timeout_s
        return self._retry([e for e in self.entries.values()
                            if e.state != QUEUED and e.since < limit])

    def abandon(self) -> list[Entry]:
        """Every pending request, removed (the daemon stops without them)."""
        entries = list(self.entries.values())
        self.entries.clear()
        self.queue.clear()
        self.load.clear()
        self._by_client.clear()
        return entries

    # ---- counts ------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self.entries)

    @property
    def inflight(self) -> int:
        return len(self.entries) - len(self.queue)

    def by_state(self) -> dict[str, int]:
        counts = collections.Counter(e.state for e in self.entries.values())
        return {state: counts.get(state, 0) for state in STATES}

    # ---- inside --------------------------------------------------------------------------

    def _held(self, rids: Iterable[str], worker: str) -> Iterator[Entry]:
        for rid in rids:
            entry = self.entries.get(rid)
            if entry is not None and worker in entry.holders:
                yield entry

    def _retry(self, entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
        retried, given_up = [], []
        for entry in entries:
            if entry.request.attempt >= RETRIES:
                self.answer(entry.rid)
                given_up.append(entry)
                continue
            r = entry.request
            entry.request = dataclasses.replace(r, attempt=r.attempt + 1, token="")
            entry.token = ""
            self._move(entry, QUEUED, (), None)
            retried.append(entry)
        self.queue.extendleft(e.rid for e in reversed(retried))   # first, in their order
        self.retried += len(retried)
        return retried, given_up

    def _move(self, entry: Entry, state: str, holders: tuple[str, ...],
              executor: str | None, now: float | None = None) -> None:
        self._unload(entry)
        entry.state, entry.holders, entry.executor = state, holders, executor
        entry.since = self.clock() if now is None else now
        for worker in _room_taken(entry):
            self.load[worker] += 1

    def _free(self, freed: collections.Counter[str]) -> None:
        """Room given back, by worker."""
        load = self.load
        for worker, n in freed.items():
            load[worker] -= n
            if load[worker] <= 0:
                del load[worker]

    def _unload(self, entry: Entry) -> None:
        for worker in _room_taken(entry):
            self.load[worker] -= 1
            if self.load[worker] <= 0:
                del self.load[worker]


def _room_taken(entry: Entry) -> tuple[str, ...]:
    """Whose room the request takes: the preprocess worker while it decodes, and the
    executor until the executor has taken it into a batch."""
    if entry.state == PREPROCESS:
        return entry.holders
    if entry.state == TO_EXECUTOR and entry.executor is not None:
        return (entry.executor,)
    return ()
