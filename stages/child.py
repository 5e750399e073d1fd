"""What every stage process does the same way: its control socket, liveness, fatal exit.

A worker is started by the front (`pspnet.stages.worker`) or by hand (`pspnet worker`). It talks
to the front over one DEALER (work and peer lists in; notes, answers and heartbeats out);
pixels and outputs go straight to the next stage on sockets of their own. Every thread
sends on that one socket, under a lock, so the front hears a worker's notes in the order
they were sent (the executor's "took" before its "handed").

Liveness comes from the loop that does the work: it calls `tick()` on every turn (its
polls time out at least every POLL_S), and the heartbeat leaves from there. A loop that
stops turning (a hung call, SIGSTOP) sends nothing, and the front stops the process after
--liveness-timeout. A helper thread the loop depends on (the executor's runner) is
`watch`ed: the heartbeat reports it "stuck" once it has spent longer in one call than it
may, and the process exits when it has died, so the front restarts it either way.

Long legitimate work is not silence: a step whose length grows with the image (decoding a
49 Mpx photo, resizing its labels back and writing the PNG) runs inside `long_step`, and
while it does a helper thread of its own sends the heartbeat the loop cannot, for as long
as the step's budget (--liveness-timeout plus STEP_S_PER_MPX per million pixels) lasts.
Past the budget it reports the step stuck and the front restarts the worker: a worker is
restarted for making no progress, never for one big image under --max-pixels.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import structlog
import zmq

from pspnet.core import wire
from pspnet.core.config import Addresses, PipelineConfig
from pspnet.core.exits import EXIT_CANNOT_START, EXIT_FAILED
from pspnet.core.keys import (
    WORKERS,
    ClientHandshakes,
    KeyAuthenticator,
    Keys,
    connect_curve,
    serve_curve,
    start_authenticator,
)
from pspnet.core.logs import configure_logging
from pspnet.core.pipeline import Stage
from pspnet.core.trust import Refusals, Trust
from pspnet.core.uploads import worker_frame_limit
from pspnet.model.manifest import model_version

SEND_LINGER_MS = 2000   # on exit, let queued answers reach the front
SEND_TIMEOUT_MS = 10_000  # tcp: a send to the front that cannot leave (a refused key)
NOTE_SLICES = 4         # streaming answers and an executor's notes wait up to this
                        # many --coalesce-ms slices (20 ms by default)
ROOM_SHARE = 4          # ... while they free less than 1/ROOM_SHARE of its room
FAST_ANSWERS = 2        # answers pending at once: they stream, and may wait NOTE_SLICES
POLL_S = 0.2            # a work loop waits at most this long before it turns again
# a long step's budget beyond --liveness-timeout, per million pixels: decoding runs at about
# 0.1 s per Mpx on a quiet core (a 49 Mpx JPEG: 4.9 s), so ten times that for a loaded host
STEP_S_PER_MPX = 1.0


@dataclass
class Watched:
    """A helper thread whose progress the heartbeat vouches for."""

    name: str
    thread: threading.Thread | None = None
    busy_since: float | None = None    # inside one call since (monotonic)
    allowance_s: float = 0.0           # how long that call may take
    error: str | None = None           # why it ended, when it did

    def busy(self, allowance_s: float) -> None:
        self.allowance_s = allowance_s
        self.busy_since = time.monotonic()

    def idle(self) -> None:
        self.busy_since = None

    def stuck(self, now: float) -> str | None:
        since = self.busy_since
        if since is None or now - since <= self.allowance_s:
            return None
        return (f"{self.name} inside one call for {now - since:.1f} s "
                f"(allowed {self.allowance_s:.1f} s)")


@dataclass
class Child:
    """Per-process state of one stage worker: its name, control socket, counters, liveness.

    `inputs`, `outputs`, `capacity` and `batch` are what the front routes by; the stage
    sets them before its first `tick()`, which introduces the worker to the front."""

    stage: Stage
    index: int
    cfg: PipelineConfig
    addrs: Addresses
    trust: Trust                       # the front's secret: tokens, identities (core.trust)
    keys: Keys | None = None           # tcp: CurveZMQ on every socket (core.keys)
    supervised: bool = True
    inputs: str = ""
    outputs: str = ""
    capacity: int = 0
    batch: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    watched: list[Watched] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pid = os.getpid()
        self.stage = Stage(self.stage)
        self.id = wire.WorkerId(self.stage, self.index, self.pid)
        self.name = str(self.id)
        self.model = _version(self.cfg.model_dir)   # named in every heartbeat
        configure_logging(self.cfg.log_level, self.cfg.log_json, stage=self.stage,
                          index=self.index, pid=self.pid)
        self.log = structlog.get_logger()
        self.ctx = zmq.Context()
        self.handshakes: ClientHandshakes | None = None   # tcp: the front's refusal, if any
        self.control = self.connect_control("main")
        self.counters.update(processed=0, errors=0, busy_s=0.0, queue=0)
        self.refusals = Refusals(self.log.warning)   # forged data: counted, dropped
        self.lock = threading.Lock()       # counters: the executor's runner counts too
        self.send_lock = threading.Lock()  # the control socket: any thread may send
        self._next_beat = 0.0
        self._parent = os.getppid() if self.supervised else None
        self._auth: KeyAuthenticator | None = None
        self.step = Watched("work loop")        # inside a long_step: what, since, budget
        self._voucher: threading.Thread | None = None

    def serve_keyed(self, sock: zmq.Socket) -> None:
        """With tcp, before `sock` binds: CURVE with the worker key, admitting only it (a
        ZAP handler on this process's context, started once)."""
        if self.keys is None:
            return
        if self._auth is None:
            self._auth = start_authenticator(self.ctx, self.refusals,
                                             {WORKERS: self.keys.worker_public})
        serve_curve(sock, self.keys.worker_public, self.keys.worker_secret, WORKERS)

    def connect_keyed(self, sock: zmq.Socket, server_public: bytes | None = None) -> None:
        """With tcp, before `sock` connects: a CURVE client with the worker key, of the
        front (its server key) or, by default, of another worker (the worker key)."""
        if self.keys is not None:
            connect_curve(sock, server_public or self.keys.worker_public,
                          self.keys.worker_public, self.keys.worker_secret)

    def connect_control(self, role: str) -> zmq.Socket:
        """A DEALER to the front's control ROUTER under an identity that proves this
        worker's name (core.trust): "main", the worker's one socket for work, notes and
        answers (`send`, from any thread, so the front hears them in order), or a helper
        thread's own for heartbeats only ("vouch")."""
        sock = self.ctx.socket(zmq.DEALER)   # <-> front ROUTER: work in; notes, answers out
        sock.setsockopt(zmq.IDENTITY, self.trust.identity(self.name, role))
        sock.setsockopt(zmq.LINGER, SEND_LINGER_MS)
        sock.setsockopt(zmq.SNDHWM, 0)       # notes are bounded by the work the front routes
        sock.setsockopt(zmq.MAXMSGSIZE,                # refused unallocated; preprocess
                        worker_frame_limit(self.stage, self.cfg.max_upload_bytes))  # uploads
        if self.keys is not None:
            self.connect_keyed(sock, self.keys.server_public)
            # a refused handshake leaves a DEALER no peer, and a send would wait for ever
            sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
            if role == "main":
                self.handshakes = ClientHandshakes(sock)
        sock.connect(self.addrs.control)
        return sock

    def send(self, msg: wire.Message) -> None:
        """To the front, from any thread (the executor's runner sends too; no thread of
        it receives there): one socket, so the front hears them in the order sent."""
        frames = wire.encode(msg)
        with self.send_lock:
            self._push(self.control, frames)

    def _push(self, sock: zmq.Socket, frames: list[Any]) -> None:
        try:
            sock.send_multipart(frames)
        except zmq.Again:               # SEND_TIMEOUT_MS (tcp) and the front took nothing
            self.unreachable()

    def unreachable(self) -> NoReturn:
        """Nothing could be sent to the front for SEND_TIMEOUT_MS (tcp only): say why, with
        the fix where the front refused this worker's key, and exit."""
        why = self.handshakes.refused() if self.handshakes is not None else None
        self.log.error("cannot reach the front; exiting", front=self.addrs.control,
                       why=why or f"nothing left for {SEND_TIMEOUT_MS / 1000:g} s",
                       fix="pass --keys with worker.key_secret and server.key copied from "
                           "the daemon's keys folder (`pspnet keys DIR`)" if why else None)
        os._exit(EXIT_FAILED)

    def count(self, **deltas: float) -> None:
        with self.lock:
            for key, delta in deltas.items():
                self.counters[key] = self.counters.get(key, 0) + delta

    def forged(self, peer: str, why: str, **fields: object) -> None:
        """Data this worker was not handed (core.trust): counted and dropped, never used."""
        self.count(forged_dropped=1)
        self.refusals.refuse(peer, why, **fields)

    def watch(self, name: str) -> Watched:
        """Register a helper thread (set `.thread` once it is made)."""
        watched = Watched(name)
        self.watched.append(watched)
        return watched

    def tick(self, queue: int | None = None) -> None:
        """Called by the work loop on every turn: heartbeat when due, helper threads
        checked, and the front checked where it started us."""
        now = time.monotonic()
        if now < self._next_beat:
            return
        self._next_beat = now + self.cfg.heartbeat_s
        for w in self.watched:
            if w.thread is not None and not w.thread.is_alive():
                self.log.error("thread died; exiting so that the front restarts this worker",
                               thread=w.name, error=w.error)
                os._exit(EXIT_FAILED)    # the front restarts it
        if self._parent is not None and os.getppid() != self._parent:
            self.log.warning("front gone, exiting")
            os._exit(EXIT_FAILED)
        stuck = next((why for w in self.watched if (why := w.stuck(now))), None)
        if queue is not None:
            with self.lock:
                self.counters["queue"] = queue
        self._beat(None, stuck)

    def _beat(self, sock: zmq.Socket | None, stuck: str | None) -> None:
        """A heartbeat on `sock`, or (None) on the worker's control socket."""
        with self.lock:
            counters = dict(self.counters)
        counters["cpu_s"] = time.process_time()     # every thread: what the host pays
        beat = wire.Heartbeat(
            self.stage, self.index, self.pid, counters, inputs=self.inputs,
            outputs=self.outputs, capacity=self.capacity, batch=self.batch, stuck=stuck,
            model=self.model)
        if sock is None:
            self.send(beat)
        else:
            self._push(sock, wire.encode(beat))

    @contextmanager
    def long_step(self, what: str, pixels: int) -> Iterator[None]:
        """Around one step of the work loop that takes longer the bigger the image: the
        heartbeat goes on from a helper thread for --liveness-timeout plus STEP_S_PER_MPX
        per million `pixels`; then the step is reported stuck."""
        self.step.name = f"work loop ({what})"
        self.step.busy(self.cfg.liveness_timeout_s + pixels / 1e6 * STEP_S_PER_MPX)
        if self._voucher is None:
            self._voucher = threading.Thread(target=self._vouch, name="voucher", daemon=True)
            self._voucher.start()
        try:
            yield
        finally:
            self.step.idle()

    def _vouch(self) -> None:
        """The helper thread: while the loop is inside a long step and so cannot beat, beat
        for it (on a DEALER of its own: a socket belongs to one thread)."""
        sock = self.connect_control("vouch")
        while True:
            time.sleep(self.cfg.heartbeat_s)
            now = time.monotonic()
            since = self.step.busy_since
            if since is None or now - since < self.cfg.heartbeat_s:
                continue                                 # the loop turns: it beats itself
            self._beat(sock, self.step.stuck(now))

    def fatal(self, message: str) -> NoReturn:
        """Tell the front why this worker cannot start, then exit with EXIT_CANNOT_START."""
        self.log.error("cannot start", error=message)
        self.send(wire.Heartbeat(self.stage, self.index, self.pid, {}, fatal=message,
                                 model=self.model))
        self.ctx.destroy(linger=SEND_LINGER_MS)
        sys.exit(EXIT_CANNOT_START)


class Notes:
    """What a worker finished, for the front in as few messages as it may: its answers in
    one `Results`, its "handed" ids in one note per destination.

    Control per batch (issue 27): the front's cost is per message, so a worker that
    finishes many images in a row says so once: at most one message per `--coalesce-ms`
    (a time slice; 0: one message per image). Nothing waits on a quiet worker: the first
    answer after a slice without one leaves at once, so a lone image (an idle daemon) is
    answered without delay; while answers trickle (one at a time) each waits at most one
    slice. While they stream (FAST_ANSWERS or more pending when the slice ends: a batch's
    outputs finished back to back) they wait for up to NOTE_SLICES slices, so that a
    message carries a batch's answers, not two or three of them."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.wait_s = child.cfg.coalesce_ms / 1e3
        self.results: list[wire.Result] = []
        self.size = 0                      # header bytes of `results`, about
        self.handed_to: dict[str, list[str]] = {}
        self.since: float | None = None    # the first entry not yet sent
        self.sent = -math.inf              # when the last message left

    @property
    def pending(self) -> bool:
        return self.since is not None

    def result(self, result: wire.Result) -> None:
        if result.payload is not None:     # a returned mask: its own message (one frame
            self.flush()                   # of its own, which Results do not carry)
            self.child.send(result)
            return
        self._first()
        self.results.append(result)
        self.size += wire.result_size(result)
        if self.size > wire.MAX_HEADER_BYTES // 2 or len(self.results) >= wire.MAX_IDS:
            self.flush()                   # a message stays well inside decode's limits

    def handed(self, rid: str, to: str) -> None:
        self._first()
        ids = self.handed_to.setdefault(to, [])
        ids.append(rid)
        if len(ids) >= wire.MAX_IDS:
            self.flush()

    def due_in(self) -> float | None:
        """Seconds until what is pending should leave (0: now); None: nothing pending."""
        if self.since is None:
            return None
        hold = self.wait_s if len(self.results) < FAST_ANSWERS else self.wait_s * NOTE_SLICES
        return max(0.0, self.sent + hold - time.monotonic())

    def flush_if_due(self) -> None:
        if self.since is not None and self.due_in() == 0.0:
            self.flush()

    def flush(self) -> None:
        """Send everything now (the worker has nothing more waiting, or it waited long
        enough): "handed" first, since an answer ends a request."""
        for to, ids in self.handed_to.items():
            self.child.send(wire.Handed(tuple(ids), to))
        if len(self.results) == 1:
            self.child.send(self.results[0])
        elif self.results:
            self.child.send(wire.Results(tuple(self.results)))
        self.results, self.size, self.handed_to, self.since = [], 0, {}, None
        self.sent = time.monotonic()

    def _first(self) -> None:
        if self.since is None:
            self.since = time.monotonic()


class BatchNotes:
    """An executor's "took" and "handed" notes, from its two threads (the main thread
    takes a batch, the runner hands its outputs on), one message of each per time slice
    (`--coalesce-ms`): a work-conserving device runs batches of one or two when images
    trickle in, and a note per batch would then be a note per image. Whoever sends, sends
    every pending "took" before any "handed", on the worker's one socket, so the front
    never hears a request handed on before it heard it taken. The first note after a quiet
    slice leaves at once; neither note delays an answer (they free room and name holders).
    Ids taken and handed on in the same slice go in the "handed" note alone: it implies the
    "took" (the ledger moves them both steps); ids taken and not yet handed on ride in the
    same message as the slice's first "handed" (`Handed.took`, moved first), so an
    executor sends one message per slice, not two."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.wait_s = child.cfg.coalesce_ms / 1e3
        self.lock = threading.Lock()
        self.took_ids: list[str] = []
        self.handed_to: dict[str, list[str]] = {}
        self.pending = 0                   # ids in took_ids and handed_to (room they free)
        self.sent = -math.inf

    def took(self, ids: tuple[str, ...]) -> None:
        with self.lock:
            self.took_ids.extend(ids)
            self.pending += len(ids)
            self._flush_if_due()

    def handed(self, ids: tuple[str, ...], to: str) -> None:
        with self.lock:
            self.handed_to.setdefault(to, []).extend(ids)
            self.pending += len(ids)
            self._flush_if_due()

    def due_in(self) -> float | None:
        """Seconds until the pending notes should leave; None: none pending."""
        with self.lock:
            if not self.pending:
                return None
            return max(0.0, self.sent + self._slice_s() - time.monotonic())

    def flush_if_due(self) -> None:
        with self.lock:
            self._flush_if_due()

    def _slice_s(self) -> float:
        """How long notes may wait after the last ones left: one slice while the room they
        would free matters (ROOM_SHARE of the executor's room or more, so a device is never
        starved of images by a note held back), else NOTE_SLICES slices (the front's cost
        is per message: a fast device that runs a batch of one or two every few hundred
        microseconds then says so once per NOTE_SLICES slices, not per batch). A "handed"
        held so does not lose a request to a postprocess worker's death: the note, when it
        comes, names the dead worker, and the front retries what it handed it
        (Front._handle)."""
        if len(self.took_ids) * ROOM_SHARE >= self.child.capacity:   # only a "took" frees
            return self.wait_s                                       # room (an id handed
        return self.wait_s * NOTE_SLICES                             # on was taken first)

    def _flush_if_due(self) -> None:
        if not self.pending:
            return
        now = time.monotonic()
        full = self.pending >= wire.MAX_IDS
        if now < self.sent + self._slice_s() and not full:
            return
        if self.handed_to and self.took_ids:    # a "handed" implies the "took" (ledger)
            handed = {i for ids in self.handed_to.values() for i in ids}
            self.took_ids = [i for i in self.took_ids if i not in handed]
        took = tuple(self.took_ids)
        if took and not self.handed_to:
            self.child.send(wire.Took(took))
        for to, ids in self.handed_to.items():   # the first carries the "took" ids: the
            self.child.send(wire.Handed(tuple(ids), to, took))   # front moves them first
            took = ()
        self.took_ids, self.handed_to, self.pending, self.sent = [], {}, 0, now


def error_result(request: wire.Request, stage: str, message: str,
                 cause: str | None = None) -> wire.Result:
    return wire.Result(id=request.id, attempt=request.attempt, status=wire.ERROR,
                       path=request.path, error=message, stage=stage, cause=cause,
                       token=request.token)


def _version(model_dir: Path) -> str:
    """The model's version for the heartbeat; "" where it cannot be read (the stage's own
    start says why, as a fatal)."""
    try:
        return model_version(model_dir)
    except OSError:
        return ""
