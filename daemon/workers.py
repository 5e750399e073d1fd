"""The workers the front has heard from, and which of them has room.

A worker introduces itself with its first heartbeat (its name is stage-index-pid, so each
life is a new worker), and every beat says where it receives data and how many requests
may be routed to it beyond what it runs (`capacity`). Its room is that capacity less the
ledger's count of requests routed to it and not yet taken (`load`): the front routes by
room, so a slow worker is never sent more than it can take. Each worker serves one model
(its `generation`): during a live reload two run, and a request's preprocess worker,
executor and postprocess worker are always of one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from pspnet.core import wire
from pspnet.core.pipeline import Stage

POST_CREDIT_BATCHES = 2         # postprocess room per executor: two of its batches in all


@dataclass
class Worker:
    """A worker the front has heard from: one of its own, or one started elsewhere."""

    name: str
    stage: Stage
    index: int
    pid: int
    local: bool
    inputs: str = ""
    outputs: str = ""
    capacity: int = 0
    batch: int = 0
    seen: float = 0.0
    counters: dict[str, float] = field(default_factory=dict)
    reachable: bool = True              # false after a send to it failed, until it beats
    generation: int | None = 0          # the model it serves; None: none the front serves


class Workers:
    def __init__(self) -> None:
        self.by_name: dict[str, Worker] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self.by_name.values()))

    def of(self, stage: Stage) -> list[Worker]:
        return [w for w in self.by_name.values() if w.stage == stage]

    def heard(self, name: str, stage: Stage, index: int, pid: int, hb: wire.Heartbeat,
              local: bool, now: float) -> tuple[Worker, bool, bool]:
        """Record a heartbeat: (the worker, new, its addresses changed)."""
        worker = self.by_name.get(name)
        new = worker is None
        if worker is None:
            worker = self.by_name[name] = Worker(name, stage, index, pid, local)
        moved = (hb.inputs, hb.outputs) != (worker.inputs, worker.outputs)
        worker.inputs, worker.outputs = hb.inputs, hb.outputs
        worker.capacity, worker.batch = hb.capacity, hb.batch
        worker.counters, worker.seen, worker.reachable = dict(hb.counters), now, True
        return worker, new, moved

    def forget(self, name: str) -> Worker | None:
        return self.by_name.pop(name, None)

    def most_room(self, stage: Stage, load: Mapping[str, int], generation: int | None,
                  ) -> tuple[int, Worker | None, int]:
        """(room, worker) of the reachable worker of `stage` with the most room (an
        executor also needs an address to be sent images; the first heard of equals), and
        how many have room; of `generation` only, when given. One pass and no list: the
        front asks on every turn."""
        best, best_room, count = None, 0, 0
        for w in self._able(stage, generation):
            room = w.capacity - load.get(w.name, 0)
            if room > 0:
                count += 1
                if room > best_room:            # the first of the most room: sorted()'s
                    best, best_room = w, room   # stable order
        return best_room, best, count

    def with_most_room(self, stage: Stage, load: Mapping[str, int]) -> Worker | None:
        """The reachable worker of `stage` with the most room, if any has room."""
        return self.most_room(stage, load, None)[1]

    def _able(self, stage: Stage, generation: int | None) -> Iterator[Worker]:
        """The workers of `stage` that may be sent work: reachable, an executor with an
        address for images, of `generation` when given."""
        executor = stage == Stage.EXECUTOR
        for w in self.by_name.values():
            if (w.stage == stage and w.reachable and (not executor or w.inputs)
                    and (generation is None or w.generation == generation)):
                yield w

    def peers(self, pool: int = 1, generation: int | None = 0,
              feeds: Mapping[int, int] | None = None) -> wire.Peers:
        """What postprocess workers are told: where every executor hands out outputs, and
        how many to ask each for (two of its batches over the postprocess pool: `pool`
        workers are expected, or as many as have joined if more). Not over those heard so
        far: the first to start would be granted the whole room and keep it. Only the
        executors of the postprocess workers' own model (`generation`), and those of a
        model whose outputs they serve too (`feeds`: a new model of the same geometry
        and classes, during a reload)."""
        feeds = feeds or {}
        executors = [w for w in self.of(Stage.EXECUTOR) if w.outputs
                     and feeds.get(w.generation, w.generation) == generation]
        batch = max((w.batch for w in executors), default=1)
        posts = max(1, pool, len([w for w in self.of(Stage.POSTPROCESS)
                                  if w.generation == generation]))
        credits = max(2, math.ceil(POST_CREDIT_BATCHES * batch / posts))
        return wire.Peers(tuple((w.name, w.outputs) for w in executors), credits)
