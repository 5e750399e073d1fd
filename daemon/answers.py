"""Answer delivery: one answer per accepted request, under the id its client gave.

The front's part after a request is done (or given up): counted, its areas summed into
the running mIoU, its latency handed to the metrics hook, a failure logged, and the answer
queued for whoever asked (`take`). Kept apart from the front, which decides *when* a
request is answered; this decides *what* the answer is and who hears of it.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from pspnet.core import wire
from pspnet.core.status import Tally
from pspnet.daemon.ledger import Entry, Ledger
from pspnet.model.metrics import IoUAccumulator

RATE_WINDOW_S = 10.0


class Answers:
    def __init__(self, totals: Tally, metrics: IoUAccumulator, log: Any) -> None:
        self.totals, self.metrics, self.log = totals, metrics, log
        self.ready: list[tuple[wire.Result, Any]] = []
        self.blocks: list[tuple[wire.OkAnswers, Any]] = []   # ok answers in columns
        self.answered_at: collections.deque[float] = collections.deque()
        # called with (status, stage, seconds since accepted) for each answer: metrics
        self.on_answer: Callable[[str, str, float], None] | None = None

    def deliver(self, entry: Entry, status: str, mask: str | None, error: str | None,
                stage: str, areas: Any = None, cause: str | None = None,
                found: tuple[Any, Any] = (None, ()), quiet: bool = False,
                model: str = "", returned: tuple[Any, str] = (None, "")) -> None:
        """One answer for one accepted request (the ledger has removed it). `found`: the
        image's size and the classes in its mask. `quiet`: a failure the caller logs once
        for all (abandoned at shutdown). `model`: the version of the model that answered.
        `returned`: the mask the request asked back (a buffer) and what it is."""
        if status == wire.OK and areas is not None:
            self.metrics.add(areas)
        self.totals["ok" if status == wire.OK else "errors"] += 1
        if self.on_answer is not None:
            self.on_answer(status, stage, time.monotonic() - entry.accepted)
        self._answered(1)
        if status != wire.OK and cause != wire.STORAGE and not quiet:   # those: one line
            self.log.warning("request failed", id=entry.client_id,
                             path=entry.request.path, stage=stage, error=error)
        request = entry.request             # positional: one per image, half the cost
        self.ready.append((wire.Result(entry.client_id, request.attempt, status,
                                       request.path, mask, error, stage, areas, cause,
                                       found[0], found[1], "", returned[0], returned[1],
                                       model), entry.origin))

    def from_worker(self, entry: Entry, result: wire.Result, model: str) -> None:
        """A worker's admitted answer, stamped with the version of the model that ran it."""
        areas = result.areas    # a replaced model's, of other classes (--force): not summed
        if areas is not None and areas.shape != self.metrics.areas.shape:
            areas = None
        self.deliver(entry, result.status, result.mask, result.error, result.stage, areas,
                     result.cause, (result.size, result.found), model=model,
                     returned=(result.payload, result.returned))

    def from_workers(self, admitted: list[tuple[Entry, wire.Result, str]]) -> None:
        """A message's admitted answers (entry, answer, model version): an ok one without
        a failure to log or a hook to call is delivered here, its counts and areas summed
        once for the message; the others one by one (`from_worker`)."""
        if self.on_answer is not None:
            for entry, result, model in admitted:
                self.from_worker(entry, result, model)
            return
        shape, summed, ready, n = self.metrics.areas.shape, [], self.ready, 0
        for entry, r, model in admitted:
            if r.status != wire.OK:
                self.from_worker(entry, r, model)
                continue
            areas = r.areas if r.areas is not None and r.areas.shape == shape else None
            if areas is not None:
                summed.append(areas)
            request, n = entry.request, n + 1
            ready.append((wire.Result(entry.client_id, request.attempt, wire.OK, request.path,
                                      r.mask, r.error, r.stage, areas, r.cause, r.size,
                                      r.found, "", r.payload, r.returned, model), entry.origin))
        if summed:
            self.metrics.add_many(summed)
        if n:
            self.totals["ok"] += n
            self._answered(n)

    def from_ok(self, ok: wire.OkAnswers, admitted: list[tuple[int, Entry, str]]) -> None:
        """A message's admitted ok answers in columns (index, entry, model version), with
        no object per answer (issue 27): their areas summed in one numpy call, counted
        once, and queued for whoever asked as columns too (one block per origin: ids,
        attempts and paths the ledger's, the model's version stamped)."""
        if not admitted:
            return
        shape = self.metrics.areas.shape
        fits = ok.areas is not None and ok.areas.shape[1:] == shape
        if fits:
            rows = ok.rows
            summed = [rows[i] for i, _, _ in admitted if rows[i] >= 0]
            if summed:                                    # one call: K x 4 x C (the
                self.metrics.add_many(ok.areas if len(summed) == len(ok.areas)   # frame's
                                      else ok.areas[summed])                    # own rows)
        if self.on_answer is not None:
            now, hook, stages = time.monotonic(), self.on_answer, ok.stages
            for i, entry, _ in admitted:
                hook(wire.OK, stages[i], now - entry.accepted)
        n = len(admitted)
        self.totals["ok"] += n
        self._answered(n)
        by_origin: dict[Any, list[tuple[int, Entry, str]]] = {}
        for answer in admitted:
            by_origin.setdefault(answer[1].origin, []).append(answer)
        for origin, mine in by_origin.items():
            block = ok.pick([i for i, _, _ in mine], areas=fits)
            requests = [entry.request for _, entry, _ in mine]
            self.blocks.append((dataclasses.replace(
                block, ids=[entry.client_id for _, entry, _ in mine],
                attempts=[r.attempt for r in requests], paths=[r.path for r in requests],
                tokens=[""] * len(mine), models=[model for _, _, model in mine]), origin))

    def _answered(self, n: int) -> None:
        """`n` answers now, for the rate over the last RATE_WINDOW_S."""
        now = time.monotonic()
        self.answered_at.extend([now] * n)
        if self.answered_at[0] < now - RATE_WINDOW_S:
            while self.answered_at and self.answered_at[0] < now - RATE_WINDOW_S:
                self.answered_at.popleft()

    def malformed(self, ledger: Ledger, exc: wire.WireError) -> None:
        """A worker's message that does not decode: dropped, and its request (where its id
        could be read) answered with the error."""
        self.totals["malformed"] += 1
        self.log.warning("malformed message dropped", socket="control", error=str(exc))
        entry = ledger.answer(exc.request_id) if exc.request_id else None
        if entry is not None:
            self.failed(entry, f"internal message malformed: {exc}")

    def abandon(self, entries: list[Entry], reason: str) -> None:
        """Stopping without them: each answered once with `reason` (logged by the caller)."""
        for entry in entries:
            self.failed(entry, reason, quiet=True)
        self.totals["abandoned"] += len(entries)

    def failed(self, entry: Entry, error: str, quiet: bool = False) -> None:
        """The front's own error answer (malformed, given up, abandoned)."""
        self.deliver(entry, wire.ERROR, None, error, "front", quiet=quiet)

    def take(self) -> list[tuple[wire.Result, Any]]:
        """Every answer since the last take, one Result each (the in-process API)."""
        ready, self.ready = self.ready, []
        if self.blocks:
            blocks, self.blocks = self.blocks, []
            for block, origin in blocks:
                ready.extend((result, origin) for result in block.each())
        return ready

    def take_messages(self) -> list[tuple[list[wire.Result], list[wire.OkAnswers], Any]]:
        """Every answer since the last take, by who asked: (answers one by one, blocks of
        ok answers in columns, origin). The daemon sends a client's as they are."""
        grouped: dict[Any, tuple[list[wire.Result], list[wire.OkAnswers], Any]] = {}
        for result, origin in self.ready:
            grouped.setdefault(origin, ([], [], origin))[0].append(result)
        for block, origin in self.blocks:
            grouped.setdefault(origin, ([], [], origin))[1].append(block)
        self.ready, self.blocks = [], []
        return list(grouped.values())

    def per_second(self) -> float:
        """Answers per second over the last RATE_WINDOW_S."""
        now = time.monotonic()
        return round(sum(t >= now - RATE_WINDOW_S for t in self.answered_at)
                     / RATE_WINDOW_S, 2)


def deliver_turn(answers: list[tuple[list[wire.Result], list[wire.OkAnswers], Any]],
                 to_client: Callable[[bytes, wire.Message], None],
                 elsewhere: Callable[[wire.Result, Any], None]) -> None:
    """One turn's answers (`Answers.take_messages`) to whoever asked: a client (its socket
    identity) gets its ok answers in columns as they came, a message per block, and the
    others in as few messages as fit (issue 27); others (watch mode) one by one."""
    for results, blocks, origin in answers:
        if isinstance(origin, bytes):
            for block in blocks:
                for part in in_parts(block):
                    to_client(origin, wire.Results((), part))
            for msg in in_messages(results):
                to_client(origin, msg)
        else:
            for result in [r for block in blocks for r in block.each()] + results:
                elsewhere(result, origin)


def in_parts(block: wire.OkAnswers) -> list[wire.OkAnswers]:
    """A block of answers in columns as messages within decode's limits: a client's ids
    may be longer than the front's, for which its worker sized the message."""
    size = 64 * len(block) + 12 * len(block.classes) + sum(map(len, block.ids)) \
        + sum(map(len, block.paths)) + sum(len(m) for m in block.masks if m)
    if size <= wire.MAX_HEADER_BYTES // 2 or len(block) == 1:
        return [block]
    half = len(block) // 2
    return [*in_parts(block.pick(list(range(half)))),
            *in_parts(block.pick(list(range(half, len(block)))))]


def in_messages(results: list[wire.Result]) -> list[wire.Result | wire.Results]:
    """One client's answers as few messages as decode's limits allow."""
    if len(results) == 1:
        return [results[0]]
    out: list[wire.Result | wire.Results] = []
    group: list[wire.Result] = []
    size = 0
    for result in results:
        if result.payload is not None:      # a returned mask: a message of its own
            out.append(result)
            continue
        size += wire.result_size(result)
        if group and (size > wire.MAX_HEADER_BYTES // 2 or len(group) >= wire.MAX_IDS):
            out.append(wire.Results(tuple(group)))
            group, size = [], wire.result_size(result)
        group.append(result)
    if group:
        out.append(wire.Results(tuple(group)) if len(group) > 1 else group[0])
    return out
