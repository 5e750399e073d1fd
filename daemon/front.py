"""The front: the control plane of one node.

It binds one ROUTER that every worker's DEALER connects to (stable end binds; restarted or
remote workers find it), and owns the ledger (where each request is) and the supervisor
(its own worker processes). It hands a request to a preprocess worker with room, naming
the executor with the most room as the destination of its pixels; it hears notes
("handed", "took"), answers and heartbeats, and tells postprocess workers where the
executors are. Pixels and outputs never pass through it: per image it sees a few hundred
bytes of control. Answers come out of `take_answers`; the daemon's `Server` drives the
steps (`read`, `supervise`, `dispatch`) from its loop, and `run` drives them for callers
in the same process (bench, eval, tests).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import structlog
import zmq

from pspnet.core import wire
from pspnet.core.config import Addresses, PipelineConfig, private_dir, start_document
from pspnet.core.keys import KeysError
from pspnet.core.status import (
    FrontCounts,
    FrontStatus,
    RemoteWorker,
    StageStatus,
    Status,
    Tally,
    WorkerFigures,
    counter_names,
    summed,
)
from pspnet.daemon.control_gate import ControlGate, Forged
from pspnet.daemon.ledger import Ledger
from pspnet.daemon.storage import StorageEpisode
from pspnet.daemon.supervisor import STAGES, CannotStart, Supervisor
from pspnet.daemon.workers import Worker, Workers
from pspnet.model.manifest import Manifest, pick_batch_size
from pspnet.model.metrics import IoUAccumulator

CHECK_EVERY_S = 0.1             # supervision, liveness and stall checks
RATE_WINDOW_S = 10.0
CONTROL_READS_PER_TURN = 1024   # bounded: the loop also serves clients and supervision
NAME = re.compile(r"^(preprocess|executor|postprocess)-(\d{1,4})-(\d{1,10})$")
DEAD_COUNTERS = counter_names(WorkerFigures)   # a dead worker's counts are kept


class PipelineError(RuntimeError):
    """The pipeline cannot run (a worker cannot start); the message says which and why."""


class StartInterrupted(RuntimeError):
    """start() was asked to stop (a signal) before every worker had started; all stopped."""


class Front:
    def __init__(self, cfg: PipelineConfig,
                 around_spawn: Callable[[], AbstractContextManager[None]] = nullcontext,
                 ) -> None:
        """`around_spawn`: entered around each worker start (the daemon's door lends it
        the descriptors it keeps in reserve)."""
        self.cfg = cfg
        self.around_spawn = around_spawn
        self.log = structlog.get_logger().bind(component="front")
        self.manifest = Manifest.read(cfg.model_dir)
        batch = pick_batch_size(self.manifest, cfg.batch_size)
        self.max_inflight = cfg.max_inflight or max(64, 4 * batch * len(cfg.devices))
        self.ledger = Ledger()
        self.workers = Workers()
        self.past: collections.Counter[tuple[str, str]] = collections.Counter()
        self.metrics = IoUAccumulator(self.manifest.num_classes)
        self.totals = Tally(FrontCounts)
        self.answers: list[tuple[wire.Result, Any]] = []
        self.answered_at: collections.deque[float] = collections.deque()
        self.bytes_in = self.bytes_out = 0
        self.storage = StorageEpisode(self.log)
        self.gate = ControlGate(cfg, self.log)      # keys, identities, tokens
        self.started = False
        self._next_check = 0.0
        self._own_run_dir = cfg.run_dir is None
        # called with (status, stage, seconds since accepted) for each answer: metrics
        self.on_answer: Callable[[str, str, float], None] | None = None

    # ---- start and stop ----------------------------------------------------------------

    def start(self, interrupted: Callable[[], bool] | None = None) -> None:
        """Bind, start every worker, wait until each has reported once. `interrupted` is
        asked on each pass of that wait: when true, everything is stopped and
        StartInterrupted raised."""
        if self.started:                  # a second set of workers would outlive close()
            raise PipelineError("this front is started already")
        self.run_dir = private_dir(self.cfg.resolved_run_dir()) \
            if self.cfg.transport == "ipc" else None
        self.addrs = Addresses.for_config(self.cfg, self.run_dir)
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.ROUTER)   # <-> every worker's DEALER: work and
        self.control.setsockopt(zmq.LINGER, 0)       # peers out; notes, answers, beats in
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.control.setsockopt(zmq.SNDHWM, 0)       # bounded by credits, not by ZeroMQ
        self.control.setsockopt(zmq.RCVHWM, 0)
        self.control.setsockopt(zmq.MAXMSGSIZE, wire.MAX_CONTROL_FRAME_BYTES)  # before malloc
        try:
            self.gate.secure(self.ctx, self.control)    # tcp: CurveZMQ, the worker key
        except (KeysError, OSError) as exc:             # --keys unreadable
            self.ctx.destroy(linger=0)
            self._remove_run_dir()
            raise PipelineError(f"--keys: {exc}") from exc
        try:
            self.control.bind(self.addrs.control)
        except zmq.ZMQError as exc:
            self.gate.close()
            self.ctx.destroy(linger=0)
            self._remove_run_dir()
            why = f"cannot listen at {self.addrs.control}: {zmq.strerror(exc.errno)}"
            if self.cfg.transport == "tcp":
                why += (f" (--transport tcp uses port {self.cfg.tcp_ports} on "
                        f"{self.cfg.tcp_host}; choose another --tcp-base-port)")
            raise PipelineError(why) from exc
        self.gate.listening(self.control)
        self.supervisor = Supervisor(self.cfg, start_document(
            self.cfg, self.addrs, self.gate.trust, self.gate.curve), self.around_spawn)
        self.started = True
        try:
            self.log.info("starting", run_dir=str(self.run_dir), control=self.addrs.control,
                          backend=self.cfg.backend, devices=list(self.cfg.devices),
                          children=[s.label for s in self.supervisor.slots])
            self.supervisor.spawn_all()
            while any(s.heard is None for s in self.supervisor.slots):
                if interrupted is not None and interrupted():
                    raise StartInterrupted("stopped during start-up")
                self.poll(100, starting=True)
            self.log.info("started", pids={s.label: s.proc.pid for s in self.supervisor.slots})
        except BaseException:
            self.close()                  # whatever ended it, no worker outlives the start
            raise

    def close(self, until: float | None = None, hurry: Callable[[], bool] | None = None,
              ) -> None:
        """Stop every worker (no drain: the caller drains first), close, clean up. `until`
        and `hurry`: when those still running are killed (Supervisor.stop_all)."""
        if not self.started:
            return
        self.started = False
        self.supervisor.stop_all(until, hurry)
        self.gate.close()
        self.control.close(0)
        self.ctx.term()
        self._remove_run_dir()
        self.log.info("stopped", **{k: self.totals.get(k, 0) for k in ("ok", "errors")})

    def _remove_run_dir(self) -> None:
        if self._own_run_dir and self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Front:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the in-process API ------------------------------------------------------------

    def submit(self, request: wire.Request, origin: Any = None) -> bool:
        """Queue one request; False if this origin already has one pending under its id."""
        if self.ledger.find(origin, request.id) is not None:
            return False
        self.ledger.add(request.id, request.path, request.ann, origin)
        self.totals["submitted"] += 1
        return True

    def run(self, requests: Iterable[wire.Request], backlog: int | None = None,
            ) -> Iterator[wire.Result]:
        """Stream requests through and yield each answer as it comes (not in order)."""
        backlog = backlog or 2 * self.max_inflight
        source = iter(requests)
        exhausted = False
        while True:
            while not exhausted and self.ledger.pending < backlog:
                request = next(source, None)
                if request is None:
                    exhausted = True
                else:
                    self.submit(request)
            if exhausted and not self.ledger.pending:
                return
            for result, _origin in self.poll(50):
                yield result

    def poll(self, timeout_ms: float, starting: bool = False,
             ) -> list[tuple[wire.Result, Any]]:
        """One turn without clients: wait for workers, read, supervise, dispatch."""
        if self.control.poll(timeout_ms):
            self.read()
        self.supervise(starting=starting)
        self.dispatch()
        return self.take_answers()

    def take_answers(self) -> list[tuple[wire.Result, Any]]:
        answers, self.answers = self.answers, []
        return answers

    @property
    def pending(self) -> int:
        return self.ledger.pending

    # ---- reading workers -----------------------------------------------------------------

    def read(self, budget: int = CONTROL_READS_PER_TURN) -> int:
        """Up to `budget` messages from workers. One that cannot be handled is logged and
        dropped; it never ends the daemon."""
        for n in range(budget):
            try:
                identity, *frames = self.control.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return n
            self.bytes_in += len(identity) + sum(len(f) for f in frames)
            try:
                self._handle(*self.gate.sender(identity, frames), frames)
            except Forged as exc:                  # counted, dropped, never delivered
                self.totals["forged_dropped"] += 1
                self.gate.refused(identity, exc)
            except wire.WireError as exc:
                self._malformed(exc)
            except Exception:              # a bug must cost one message, not the daemon
                self.totals["malformed"] += 1
                self.log.exception("internal message not handled")
        return budget

    def _handle(self, name: str, own: bool, frames: list[zmq.Frame]) -> None:
        match = NAME.match(name)
        if match is None:
            raise wire.WireError(f"a peer that is not a worker: {name[:80]!r}")
        stage, index, pid = match[1], int(match[2]), int(match[3])
        now = time.monotonic()
        msg = wire.decode(frames)
        if isinstance(msg, wire.Heartbeat):
            self._heartbeat(name, stage, index, pid, msg, now, own)
        elif isinstance(msg, wire.Result):
            self._answer(msg, name)
        elif isinstance(msg, wire.Took):
            self.ledger.took(name, msg.ids)
        elif isinstance(msg, wire.Handed):
            self.ledger.handed(name, msg.ids, msg.to)
            if msg.to not in self.workers:        # gone before this note came: what it
                self._retried(*self.ledger.lost(msg.to), f"{msg.to} is gone")   # got, lost
        else:
            raise wire.WireError(f"{type(msg).__name__} is not a message for the front")

    def _heartbeat(self, name: str, stage: str, index: int, pid: int, hb: wire.Heartbeat,
                   now: float, own: bool) -> None:
        if (hb.stage, hb.index, hb.pid) != (stage, index, pid):
            raise wire.WireError(f"heartbeat of {hb.stage}-{hb.index}-{hb.pid} from {name}")
        slot = self.supervisor.by_pid(pid) if own else None   # a remote one cannot speak
        if slot is not None and slot.label != f"{stage}-{index}":            # for ours
            raise Forged(f"{name} is not {slot.label}")
        local = slot is not None
        if hb.fatal:
            if slot is not None:
                slot.fatal = hb.fatal
            else:
                self.log.error("remote worker cannot start", worker=name, error=hb.fatal)
            return
        if slot is not None:
            slot.heard = now                # only the work loop's beat is liveness
        worker, new, moved = self.workers.heard(name, stage, index, pid, hb, local, now)
        if new and not local:
            self.log.info("remote worker joined", worker=name, inputs=hb.inputs or None)
        if hb.stuck:
            self._stuck(worker, hb.stuck)
        elif stage == "executor" and moved:       # a new executor, or a new address
            self._send_peers(self.workers.of("postprocess"))
        elif stage == "postprocess" and new:
            self._send_peers([worker])

    def _stuck(self, worker: Worker, why: str) -> None:
        slot = self.supervisor.by_pid(worker.pid) if worker.local else None
        if slot is not None:
            self.supervisor.stop(slot, why)
        else:
            self.log.warning("remote worker stuck; routing around it", worker=worker.name,
                             reason=why)
            self._forget(worker.name, why)

    def _answer(self, result: wire.Result, sender: str) -> None:
        entry = self.ledger.entries.get(result.id)
        if entry is None or result.attempt < entry.request.attempt:
            self.totals["duplicates_dropped"] += 1       # answered, or an earlier attempt's
            return
        self.gate.check_answer(result, sender, entry.request.attempt, entry.executor,
                               entry.holders, sender in self.workers)
        self.ledger.answer(result.id)
        if result.areas is not None and result.areas.shape != self.metrics.areas.shape:
            result = dataclasses.replace(   # checked before anything adds them: the request
                result, status=wire.ERROR, areas=None,  # is answered, never lost
                error=f"areas {result.areas.shape}, the model has "
                      f"{self.manifest.num_classes} classes")
        self.storage.saw(result)
        self._deliver(entry, result.status, result.mask, result.error, result.stage,
                      result.areas, result.cause, (result.size, result.found))

    def _deliver(self, entry: Any, status: str, mask: str | None, error: str | None,
                 stage: str, areas: Any = None, cause: str | None = None,
                 found: tuple[Any, Any] = (None, ()), quiet: bool = False) -> None:
        """One answer for one accepted request, under the id its client gave; `found`: the
        image's size and the classes in its mask."""
        if status == wire.OK and areas is not None:
            self.metrics.add(areas)
        self.totals["ok" if status == wire.OK else "errors"] += 1
        now = time.monotonic()
        if self.on_answer is not None:
            self.on_answer(status, stage, now - entry.accepted)
        self.answered_at.append(now)
        while self.answered_at and self.answered_at[0] < now - RATE_WINDOW_S:
            self.answered_at.popleft()
        if status != wire.OK and cause != wire.STORAGE and not quiet:   # those: one line
            self.log.warning("request failed", id=entry.client_id,
                             path=entry.request.path, stage=stage, error=error)
        self.answers.append((wire.Result(entry.client_id, entry.request.attempt, status,
                                         entry.request.path, mask=mask, error=error,
                                         stage=stage, areas=areas, cause=cause,
                                         size=found[0], found=found[1]),
                             entry.origin))

    def _malformed(self, exc: wire.WireError) -> None:
        self.totals["malformed"] += 1
        self.log.warning("malformed message dropped", socket="control", error=str(exc))
        entry = self.ledger.answer(exc.request_id) if exc.request_id else None
        if entry is not None:
            self._deliver(entry, wire.ERROR, None, f"internal message malformed: {exc}",
                          "front")

    # ---- routing ---------------------------------------------------------------------

    def dispatch(self) -> None:
        """Queued requests to preprocess workers with room, each bound for the executor
        with the most room: a slow device is sent no more than it can take."""
        ledger = self.ledger
        while ledger.queue and ledger.inflight < self.max_inflight:
            prep = self.workers.with_most_room("preprocess", ledger.load)
            executor = self.workers.with_most_room("executor", ledger.load)
            if prep is None or executor is None:
                return
            entry = ledger.next_queued()
            frames = wire.encode(wire.Dispatch(self.gate.dispatched(entry.request, executor.name),
                                               executor.name, executor.inputs))
            try:
                self.control.send_multipart([self.gate.route(prep.name), *frames], zmq.NOBLOCK)
            except zmq.ZMQError:            # gone (ROUTER_MANDATORY): until it beats again
                prep.reachable = False
                continue
            self.bytes_out += len(prep.name) + sum(len(f) for f in frames)
            ledger.dispatched(entry, prep.name, executor.name)

    def _send_peers(self, to: list[Worker]) -> None:
        """Tell postprocess workers where the executors hand out outputs."""
        frames = wire.encode(self.workers.peers(self.cfg.postprocess_workers))
        for worker in to:
            try:
                self.control.send_multipart([self.gate.route(worker.name), *frames],
                                            zmq.NOBLOCK)
                self.bytes_out += len(worker.name) + sum(len(f) for f in frames)
            except zmq.ZMQError:
                worker.reachable = False

    # ---- supervision -------------------------------------------------------------------

    def supervise(self, starting: bool = False) -> None:
        """Once per CHECK_EVERY_S: deaths, silent or stuck workers, stalled requests."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CHECK_EVERY_S
        try:
            deaths = self.supervisor.check(now, starting=starting)
        except CannotStart as exc:
            self.read()                    # its last words may say why
            raise PipelineError(self._cannot_start_reason(exc)) from exc
        for death in deaths:
            self._forget(death.name, f"{death.slot.label} died (exit status {death.exitcode})")
        for worker in [w for w in self.workers if not w.local]:
            if now - worker.seen > self.cfg.liveness_timeout_s:
                self.log.warning("remote worker silent; routing around it", worker=worker.name,
                                 silent_s=round(now - worker.seen, 1))
                self._forget(worker.name, f"remote {worker.name} went silent")
        self._retried(*self.ledger.stalled(self.cfg.stall_timeout_s),
                      f"no progress for {self.cfg.stall_timeout_s:.0f} s")

    def _cannot_start_reason(self, exc: CannotStart) -> str:
        fatal = next((s for s in self.supervisor.slots if s.fatal), None)
        if fatal is not None:
            return f"{fatal.label} cannot start: {fatal.fatal}"
        return str(exc)

    def _forget(self, name: str, reason: str) -> None:
        """A worker is gone: keep its counts, retry what it held, re-route."""
        worker = self.workers.forget(name)
        if worker is not None and worker.local:
            for key in DEAD_COUNTERS:
                self.past[(worker.stage, key)] += worker.counters.get(key, 0)
        self._retried(*self.ledger.lost(name), reason)
        if worker is not None and worker.stage == "executor":
            self._send_peers(self.workers.of("postprocess"))

    def _retried(self, retried: list[Any], given_up: list[Any], reason: str) -> None:
        self.totals["retried"] += len(retried)
        for entry in given_up:
            self._deliver(entry, wire.ERROR, None, f"given up after a retry: {reason}",
                          "front")

    # ---- status and shutdown -----------------------------------------------------------

    def status(self) -> Status:
        """The front's part of the status document (core/status.py declares its figures)."""
        stages = {}
        for stage in STAGES:
            slots = [s for s in self.supervisor.slots if s.stage == stage]
            stages[stage] = StageStatus(
                **summed([w.counters for w in self.workers.of(stage) if w.local],
                         {key: n for (s, key), n in self.past.items() if s == stage}),
                processes=len(slots), alive=sum(s.alive for s in slots),
                up=sum(s.alive and s.heard is not None for s in slots),
                restarts=sum(s.restarts for s in slots),
                pids=[s.proc.pid for s in slots if s.proc is not None])
        now = time.monotonic()
        recent = sum(t >= now - RATE_WINDOW_S for t in self.answered_at)
        answered = self.totals["ok"] + self.totals["errors"]
        moved = self.bytes_in + self.bytes_out
        front = FrontStatus(
            **self.totals, queued=len(self.ledger.queue), inflight=self.ledger.inflight,
            at=self.ledger.by_state(), cpu_s=time.process_time(), bytes_in=self.bytes_in,
            bytes_out=self.bytes_out, restarts=self.supervisor.restarts,
            bytes_per_image=round(moved / answered, 1) if answered else None)
        remote = [RemoteWorker(**summed([w.counters]), stage=w.stage, index=w.index,
                               pid=w.pid, seen_s_ago=round(now - w.seen, 1))
                  for w in self.workers if not w.local]
        return Status(stages=stages, front=front, remote=remote,
                      images_per_s=round(recent / RATE_WINDOW_S, 2),
                      metrics=self.metrics.summary() if self.metrics.images else None)

    def abandon(self, reason: str) -> list[tuple[wire.Result, Any]]:
        """Answer every pending request with the error `reason` (stopping without them):
        each is still answered exactly once, and later answers for them are dropped."""
        entries = self.ledger.abandon()
        for entry in entries:
            self._deliver(entry, wire.ERROR, None, reason, "front", quiet=True)  # logged once
        self.totals["abandoned"] += len(entries)
        return self.take_answers()


def requests_for(paths: Iterable[str | Path], anns: Iterable[str | None] | None = None,
                 ) -> list[wire.Request]:
    """Requests with ids 0..n-1 for a list of paths (and optional ground truths)."""
    anns = list(anns) if anns is not None else None
    return [wire.Request(str(i), str(Path(p)),
                         None if anns is None or anns[i] is None else str(anns[i]))
            for i, p in enumerate(paths)]
