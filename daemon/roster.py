"""Who is in the pipeline: heartbeats heard, workers introduced and forgotten, their counts.

The front's liveness side, kept apart from its request side: a worker introduces itself
with its first heartbeat (checked against the identity it speaks under), a stuck one is
stopped (its own) or routed around (a remote one), a remote one that falls silent is
forgotten, and postprocess workers are told where the executors are whenever that
changes. A dead worker's counters are kept (`past`), so the status stays monotonic. During
a live reload each worker belongs to one model's generation: the supervisor's slot says
for its own, the version in its heartbeat for a remote one (`versions`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import zmq

from pspnet.core import wire
from pspnet.core.pipeline import STAGES, Stage
from pspnet.core.status import RemoteWorker, StageStatus, WorkerFigures, counter_names, summed
from pspnet.daemon.control_gate import Forged
from pspnet.daemon.supervisor import Supervisor
from pspnet.daemon.workers import Worker, Workers

DEAD_COUNTERS = counter_names(WorkerFigures)   # a dead worker's counts are kept


class Roster:
    def __init__(self, supervisor: Supervisor, send: Callable[[Worker, list], bool],
                 postprocess_pool: int, log: object) -> None:
        """`send(worker, frames)`: to a worker on the front's control socket; False when
        it could not be sent."""
        self.supervisor, self.send, self.pool, self.log = supervisor, send, postprocess_pool, log
        self.workers = Workers()
        self.past: collections.Counter[tuple[str, str]] = collections.Counter()
        self.active = 0                           # the generation new requests go to
        self.versions: dict[int, str] = {}        # generation -> its model's version
        # a reload to a model of the same geometry and classes: its generation -> the
        # one whose preprocess and postprocess workers serve it too (daemon.reload)
        self.feeds: dict[int, int] = {}

    def heard(self, wid: wire.WorkerId, own: bool, hb: wire.Heartbeat, now: float,
              forget: Callable[[str, str], None]) -> None:
        """A heartbeat from `wid`, under an identity the front's own secret proved (`own`)
        or the remote workers' one. `forget(name, why)`: the front's way to route around a
        worker (retrying what it held), for a remote one that reports itself stuck. Raises
        Forged for one that speaks for another of the front's workers."""
        if (hb.stage, hb.index, hb.pid) != (wid.stage, wid.index, wid.pid):
            raise wire.WireError(f"heartbeat of {hb.stage}-{hb.index}-{hb.pid} from {wid}")
        slot = self.supervisor.by_pid(wid.pid) if own else None   # a remote one cannot
        if slot is not None and slot.label != f"{wid.stage.value}-{wid.index}":  # speak
            raise Forged(f"{wid} is not {slot.label}")                            # for ours
        local = slot is not None
        if hb.fatal:
            if slot is not None:
                slot.fatal = hb.fatal
            else:
                self.log.error("remote worker cannot start", worker=str(wid), error=hb.fatal)
            return
        if slot is not None:
            slot.heard = now                # only the work loop's beat is liveness
        worker, new, moved = self.workers.heard(str(wid), wid.stage, wid.index, wid.pid, hb,
                                                local, now)
        generation = slot.generation if slot is not None else self.generation_of(hb.model)
        joined = new or generation != worker.generation    # (a remote one: another model)
        worker.generation = generation
        if new and not local:
            self.log.info("remote worker joined", worker=str(wid), inputs=hb.inputs or None)
        if hb.stuck:
            self._stuck(worker, hb.stuck, forget)
        elif wid.stage == Stage.EXECUTOR and (moved or joined):  # new, or a new address
            self.send_peers(self.workers.of(Stage.POSTPROCESS))
        elif wid.stage == Stage.POSTPROCESS and joined:
            self.send_peers([worker])

    def _stuck(self, worker: Worker, why: str, forget: Callable[[str, str], None]) -> None:
        slot = self.supervisor.by_pid(worker.pid) if worker.local else None
        if slot is not None:
            self.supervisor.stop(slot, why)     # its death retries what it held
        else:
            self.log.warning("remote worker stuck; routing around it", worker=worker.name,
                             reason=why)
            forget(worker.name, why)

    def serves(self, generation: int | None, stage: Stage) -> bool:
        """Whether a worker of `generation` and `stage` serves the active model."""
        if stage == Stage.EXECUTOR:
            return generation == self.active
        return generation == self.feeds.get(self.active, self.active)

    def generation_of(self, version: str) -> int | None:
        """A remote worker's generation: the one serving its model (the active first), the
        active one for a worker that names none (an older version); None: no model the
        front serves, so nothing is routed to it."""
        if not version:
            return self.active
        mine = sorted(self.versions.items(), key=lambda gv: gv[0] != self.active)
        return next((gen for gen, v in mine if v == version), None)

    def send_peers(self, to: list[Worker]) -> None:
        """Tell postprocess workers where the executors of their own model hand out
        outputs."""
        frames: dict[int | None, list] = {}
        for worker in to:
            if worker.generation not in frames:
                frames[worker.generation] = wire.encode(
                    self.workers.peers(self.pool, worker.generation, self.feeds))
            if not self.send(worker, frames[worker.generation]):
                worker.reachable = False

    def forget(self, name: str) -> Worker | None:
        """A worker is gone: its counts kept, postprocess told if it was an executor."""
        worker = self.workers.forget(name)
        if worker is not None and worker.local:
            for key in DEAD_COUNTERS:
                self.past[(worker.stage, key)] += worker.counters.get(key, 0)
        if worker is not None and worker.stage == Stage.EXECUTOR:
            self.send_peers(self.workers.of(Stage.POSTPROCESS))
        return worker

    def silent_remote(self, now: float, timeout_s: float) -> list[Worker]:
        """Remote workers silent for `timeout_s` (logged: the front routes around them)."""
        silent = [w for w in self.workers if not w.local and now - w.seen > timeout_s]
        for worker in silent:
            self.log.warning("remote worker silent; routing around it", worker=worker.name,
                             silent_s=round(now - worker.seen, 1))
        return silent

    def stages(self) -> dict[str, StageStatus]:
        """Each stage of the pipeline table as the supervisor and the beats see it."""
        out = {}
        for stage in STAGES:      # the model being served: a reload's trial is not "down"
            slots = [s for s in self.supervisor.slots
                     if s.stage == stage and self.serves(s.generation, stage)
                     and not s.retiring]
            out[stage.value] = StageStatus(
                **summed([w.counters for w in self.workers.of(stage) if w.local],
                         {key: n for (s, key), n in self.past.items() if s == stage}),
                processes=len(slots), alive=sum(s.alive for s in slots),
                up=sum(s.alive and s.heard is not None for s in slots),
                restarts=sum(s.restarts for s in slots),
                pids=[s.proc.pid for s in self.supervisor.slots
                      if s.stage == stage and s.proc is not None])
        return out

    def remote(self, now: float) -> list[RemoteWorker]:
        return [RemoteWorker(**summed([w.counters]), stage=w.stage, index=w.index,
                             pid=w.pid, seen_s_ago=round(now - w.seen, 1))
                for w in self.workers if not w.local]


def send_to(control: zmq.Socket, identity: bytes, worker: Worker, frames: list) -> int | None:
    """Frames to one worker on the front's ROUTER, under its proven `identity`: the bytes
    sent, or None when it is gone (ROUTER_MANDATORY) and must not be sent more until it
    beats again."""
    try:
        control.send_multipart([identity, *frames], zmq.NOBLOCK)
    except zmq.ZMQError:
        worker.reachable = False
        return None
    return len(identity) + sum(len(f) for f in frames)
