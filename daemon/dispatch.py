"""Queued requests to preprocess workers, in groups: one message per group, each bound for
the executor with the most room (daemon/front.py's docstring says how big a group is and
why)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pspnet.core import wire
from pspnet.core.pipeline import Stage
from pspnet.daemon.control_gate import ControlGate
from pspnet.daemon.ledger import Ledger
from pspnet.daemon.roster import Roster
from pspnet.daemon.workers import Worker


def dispatch_queued(ledger: Ledger, roster: Roster, gate: ControlGate, max_inflight: int,
                    send: Callable[[Worker, list[Any]], bool]) -> None:
    """As many groups as the workers have room for, within `max_inflight`. `send`: False
    when the worker is gone (it is not sent to again until it beats)."""
    workers = roster.workers
    while ledger.queue and ledger.inflight < max_inflight:
        active = roster.active                      # the model being served, and
        fed_by = roster.feeds.get(active, active)   # whose preprocess serves it
        prep_room, prep, preps = workers.most_room(Stage.PREPROCESS, ledger.load, fed_by)
        executor_room, executor, _ = workers.most_room(Stage.EXECUTOR, ledger.load, active)
        if prep is None or executor is None:
            return
        want = min(math.ceil(len(ledger.queue) / preps), max(1, prep.capacity // 2),
                   max(1, executor.capacity // 2))
        n = min(want, prep_room, executor_room, max_inflight - ledger.inflight)
        if n < want:
            return
        entries = ledger.next_group(n)
        requests = tuple(e.request for e in entries)
        tokens = gate.tokens(requests, executor.name)   # beside, in columns: no
        frames = wire.encode(wire.Dispatch(requests, executor.name, executor.inputs,
                                           tokens))     # Request made per image
        if not send(prep, frames):
            continue
        ledger.dispatched(entries, prep.name, executor.name, tokens)
