"""The front: the control plane of one node.

It binds one ROUTER that every worker's DEALER connects to (stable end binds; restarted or
remote workers find it), and owns the ledger (where each request is) and the supervisor
(its own worker processes). It hands a request to a preprocess worker with room, naming
the executor with the most room as the destination of its pixels; it hears notes
("handed", "took"), answers and heartbeats, and tells postprocess workers where the
executors are. Pixels and outputs never pass through it: per image it sees a few hundred
bytes of control, and per message, not per image: it dispatches groups, and hears one
note per group or batch and one message of answers per few milliseconds of a worker's
work (issue 27). A dispatch group is half a worker's room (the next one waits behind it),
or the queue's fair share over the workers with room when less is queued, so a few
requests are spread, not queued behind each other on one worker; while the queue is long,
a group waits for room for all of it (notes free room a group at a time: sending what
little room there is would shrink every later group: `dispatch_queued`). Its liveness
side is the `Roster`, its answers the `AnswerIntake` (admitted, let go) and `Answers`
(delivered), its checks of who speaks the `ControlGate`; answers
come out of `take_answers` (one Result each) or `take_messages` (a worker's ok answers
still in columns, for the daemon to send a client as they are); the daemon's `Server` drives the
steps (`read`, `supervise`, `dispatch`) from its loop, and `run` drives them for callers
in the same process (bench, eval, tests). A live reload (`reloader`, daemon.reload) runs
a second model's workers beside the first: requests are dispatched within the active one,
and each answer is stamped with the version of the model whose worker answered.
"""

from __future__ import annotations

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
from pspnet.core.status import FrontCounts, FrontStatus, Status, Tally
from pspnet.core.uploads import front_frame_limit, is_upload
from pspnet.daemon.answer_intake import AnswerIntake
from pspnet.daemon.answers import Answers
from pspnet.daemon.control_gate import ControlGate, Forged
from pspnet.daemon.dispatch import dispatch_queued
from pspnet.daemon.ledger import Ledger
from pspnet.daemon.reload import Reloader
from pspnet.daemon.roster import Roster, send_to
from pspnet.daemon.storage import StorageEpisode
from pspnet.daemon.supervisor import CannotStart, Supervisor
from pspnet.daemon.workers import Worker
from pspnet.model.manifest import Manifest, pick_batch_size
from pspnet.model.metrics import IoUAccumulator

CHECK_EVERY_S = 0.1             # supervision, liveness and stall checks
CONTROL_READS_PER_TURN = 1024   # bounded: the loop also serves clients and supervision
# plain ints: no enum made per message
EVENTS, POLLIN, NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)


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
        self.metrics = IoUAccumulator(self.manifest.num_classes)
        self.totals = Tally(FrontCounts)
        self.answers = Answers(self.totals, self.metrics, self.log)
        self.bytes_in = self.bytes_out = 0
        self.storage = StorageEpisode(self.log)
        self.gate = ControlGate(cfg, self.log)      # keys, identities, tokens
        self.reloader = Reloader(self)              # live model reload: the served model
        self.intake = AnswerIntake(self.gate, self.ledger, self.storage, self.answers,
                                   self.totals, self.reloader.stamp)
        self.started = False
        self._next_check = 0.0
        self._own_run_dir = cfg.run_dir is None

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
        try:
            self.control = bind_control(self.ctx, self.cfg, self.addrs.control, self.gate)
        except PipelineError:               # the context is destroyed already
            self._remove_run_dir()
            raise
        self._poller = zmq.Poller()
        self._poller.register(self.control, zmq.POLLIN)   # workers: notes, answers, beats
        self.supervisor = Supervisor(self.cfg, start_document(
            self.cfg, self.addrs, self.gate.trust, self.gate.curve), self.around_spawn)
        self.roster = Roster(self.supervisor, self._send, self.cfg.postprocess_workers or 1,
                             self.log)
        self.roster.versions = self.reloader.versions     # each generation's model
        self.gate.ours = self._ours
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
        self.ledger.add(request.id, request.path, request.ann, origin,
                        request if is_upload(request) else None)   # its bytes, want, write
        self.totals["submitted"] += 1
        return True

    def run(self, requests: Iterable[wire.Request], backlog: int | None = None,
            ) -> Iterator[wire.Result]:
        """Stream requests through and yield each answer as it comes (not in order)."""
        return stream(self, requests, backlog or 2 * self.max_inflight)

    def poll(self, timeout_ms: float, starting: bool = False,
             ) -> list[tuple[wire.Result, Any]]:
        """One turn without clients: dispatch, wait for workers, read, supervise. Dispatch
        comes first, once a turn: what the caller submitted since the last turn leaves
        before the wait, and the room this turn's notes free is used at the next one,
        which follows at once (the caller only takes the answers in between)."""
        self.dispatch()
        if self._poller.poll(timeout_ms):     # made once: Socket.poll makes one per call
            self.read()
        self.supervise(starting=starting)
        return self.take_answers()

    def take_answers(self) -> list[tuple[wire.Result, Any]]:
        return self.answers.take()

    def take_messages(self) -> list[tuple[list[wire.Result], list[wire.OkAnswers], Any]]:
        """take_answers for the daemon: by who asked, ok answers still in columns."""
        return self.answers.take_messages()

    @property
    def pending(self) -> int:
        return self.ledger.pending

    # ---- reading workers -----------------------------------------------------------------

    def read(self, budget: int = CONTROL_READS_PER_TURN) -> int:
        """Up to `budget` messages from workers. One that cannot be handled is logged and
        dropped; it never ends the daemon."""
        control, recv = self.control, self.control.recv
        for n in range(budget):
            if not control.get(EVENTS) & POLLIN:                # no exception per turn
                return n
            identity = part = recv(NOBLOCK, copy=False)         # a message's parts come
            frames, size = [], len(identity)                    # together; each says if
            while part.more:                                    # more follow (no option
                part = recv(NOBLOCK, copy=False)                # read per part, as
                frames.append(part)                             # recv_multipart does)
                size += len(part)
            self.bytes_in += size
            try:
                self._handle(*self.gate.sender(identity, frames), frames)   # or Forged
            except Forged as exc:                  # counted, dropped, never delivered
                self.totals["forged_dropped"] += 1
                self.gate.refused(identity, exc)
            except wire.WireError as exc:
                self.answers.malformed(self.ledger, exc)
            except Exception:              # a bug must cost one message, not the daemon
                self.totals["malformed"] += 1
                self.log.exception("internal message not handled")
        return budget

    def _handle(self, wid: wire.WorkerId, own: bool, frames: list[zmq.Frame]) -> None:
        msg = wire.decode(frames)
        if isinstance(msg, wire.Results):
            if msg.ok is not None:              # the common answers: columns, in bulk
                self.intake.ok_answers(msg.ok, wid.text)
            if msg.results:
                self.intake.answers(msg.results, wid.text)
        elif isinstance(msg, wire.Result):
            self.intake.answers((msg,), wid.text)
        elif isinstance(msg, wire.Took):
            self.ledger.took(wid.text, msg.ids)
        elif isinstance(msg, wire.Handed):
            if msg.took:                         # the same slice's "took", in order: first
                self.ledger.took(wid.text, msg.took)
            self.ledger.handed(wid.text, msg.ids, msg.to)
            if msg.to not in self.roster.workers:    # gone before this note came: what it
                self._retried(*self.ledger.lost(msg.to), f"{msg.to} is gone")   # got, lost
        elif isinstance(msg, wire.Heartbeat):
            self.roster.heard(wid, own, msg, time.monotonic(), self._forget)
        else:
            raise wire.WireError(f"{type(msg).__name__} is not a message for the front")

    # ---- routing ---------------------------------------------------------------------

    def dispatch(self) -> None:
        """Queued requests to preprocess workers with room, in groups (daemon/dispatch.py)."""
        dispatch_queued(self.ledger, self.roster, self.gate, self.max_inflight, self._send)

    def _send(self, worker: Worker, frames: list[Any]) -> bool:
        sent = send_to(self.control, self.gate.route(worker.name), worker, frames)
        self.bytes_out += sent or 0
        return sent is not None

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
            raise PipelineError(cannot_start_reason(self.supervisor, exc)) from exc
        for death in deaths:
            self._forget(death.name, f"{death.slot.label} died (exit status {death.exitcode})"
                         if not death.retired else f"{death.slot.label} retired")
        self.reloader.step(now)
        for worker in self.roster.silent_remote(now, self.cfg.liveness_timeout_s):  # logged
            self._forget(worker.name, f"remote {worker.name} went silent")
        self._retried(*self.ledger.stalled(self.cfg.stall_timeout_s),
                      f"no progress for {self.cfg.stall_timeout_s:.0f} s")

    def _ours(self, wid: wire.WorkerId) -> bool:
        """Whether `wid` names a worker this front started (and still runs)."""
        slot = self.supervisor.by_pid(wid.pid)
        return slot is not None and slot.label == f"{wid.stage.value}-{wid.index}"

    def _forget(self, name: str, reason: str) -> None:
        """A worker is gone: keep its counts, retry what it held, re-route."""
        self.roster.forget(name)
        self.gate.forget(name)
        self._retried(*self.ledger.lost(name), reason)

    def _retried(self, retried: list[Any], given_up: list[Any], reason: str) -> None:
        self.totals["retried"] += len(retried)
        for entry in given_up:
            self.answers.failed(entry, f"given up after a retry: {reason}")

    # ---- status and shutdown -----------------------------------------------------------

    def status(self) -> Status:
        """The front's part of the status document (core/status.py declares its figures)."""
        return front_status(self)

    def abandon(self, reason: str) -> list[tuple[wire.Result, Any]]:
        """Answer every pending request with the error `reason` (stopping without them):
        each is still answered exactly once, and later answers for them are dropped."""
        self.answers.abandon(self.ledger.abandon(), reason)
        return self.take_answers()


def requests_for(paths: Iterable[str | Path], anns: Iterable[str | None] | None = None,
                 ) -> list[wire.Request]:
    """Requests with ids 0..n-1 for a list of paths (and optional ground truths)."""
    anns = list(anns) if anns is not None else None
    return [wire.Request(str(i), str(Path(p)),
                         None if anns is None or anns[i] is None else str(anns[i]))
            for i, p in enumerate(paths)]


def bind_control(ctx: zmq.Context, cfg: PipelineConfig, address: str, gate: ControlGate,
                 ) -> zmq.Socket:
    """The front's control socket, secured by `gate` (tcp: CurveZMQ) and bound; PipelineError
    (one line, the fix) if it cannot, with `ctx` destroyed."""
    control = ctx.socket(zmq.ROUTER)       # <-> every worker's DEALER: work and peers
    control.setsockopt(zmq.LINGER, 0)      # out; notes, answers, beats in
    control.setsockopt(zmq.ROUTER_MANDATORY, 1)
    control.setsockopt(zmq.SNDHWM, 0)      # bounded by credits, not by ZeroMQ
    control.setsockopt(zmq.RCVHWM, 0)
    control.setsockopt(zmq.MAXMSGSIZE, front_frame_limit(cfg.max_pixels))   # before malloc:
                                           # control, or a returned mask (core.uploads)
    try:
        gate.secure(ctx, control)          # tcp: CurveZMQ, the worker key
    except (KeysError, OSError) as exc:    # --keys unreadable
        ctx.destroy(linger=0)
        raise PipelineError(f"--keys: {exc}") from exc
    try:
        control.bind(address)
    except zmq.ZMQError as exc:
        gate.close()
        ctx.destroy(linger=0)
        why = f"cannot listen at {address}: {zmq.strerror(exc.errno)}"
        if cfg.transport == "tcp":
            why += (f" (--transport tcp uses port {cfg.tcp_ports} on {cfg.tcp_host}; "
                    "choose another --tcp-base-port)")
        raise PipelineError(why) from exc
    gate.listening(control)
    return control


def stream(front: Front, requests: Iterable[wire.Request], backlog: int,
           ) -> Iterator[wire.Result]:
    """Front.run: keep `backlog` requests pending, yield answers as they come."""
    source = iter(requests)
    exhausted = False
    while True:
        while not exhausted and front.ledger.pending < backlog:
            request = next(source, None)
            if request is None:
                exhausted = True
            else:
                front.submit(request)
        if exhausted and not front.ledger.pending:
            return
        for result, _origin in front.poll(50):     # dispatches what was just submitted
            yield result


def front_status(front: Front) -> Status:
    totals = front.totals
    answered = totals["ok"] + totals["errors"]
    moved = front.bytes_in + front.bytes_out
    summary = FrontStatus(
        **totals, queued=len(front.ledger.queue), inflight=front.ledger.inflight,
        at=front.ledger.by_state(), cpu_s=time.process_time(), bytes_in=front.bytes_in,
        bytes_out=front.bytes_out, restarts=front.supervisor.restarts,
        bytes_per_image=round(moved / answered, 1) if answered else None)
    return Status(stages=front.roster.stages(), front=summary,
                  remote=front.roster.remote(time.monotonic()),
                  images_per_s=front.answers.per_second(),
                  metrics=front.metrics.summary() if front.metrics.images else None,
                  model=front.reloader.describe())


def cannot_start_reason(supervisor: Supervisor, exc: CannotStart) -> str:
    fatal = next((s for s in supervisor.slots if s.fatal), None)
    return f"{fatal.label} cannot start: {fatal.fatal}" if fatal is not None else str(exc)
