"""The front: starts the stage processes, routes requests, collects answers, keeps count.

One object owns every socket, thread and child process. It binds every endpoint (children
only connect, so restarted or remote workers find it), hands requests to preprocess workers
that have asked for work, forwards pixels and outputs through two ZeroMQ streamer threads,
and answers each request exactly once: the first answer wins, later ones for the same id
are dropped. It tracks where each request is (preprocess worker k, executor, postprocess),
so when a child dies only the requests it may have held are retried, once, and then
answered as errors. The daemon drives `poll` from its supervisor loop; tests and the bench
use `run`.
"""

from __future__ import annotations

import atexit
import collections
import multiprocessing

# multiprocessing.util registers its exit hook (SIGTERM, then join, daemon children) when
# imported: here, first, so that Pipeline._stop_children_at_exit runs before it
import multiprocessing.util  # noqa: F401
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import zmq

from stages import executor, postprocess, preprocess, wire
from stages.child import STOP_SIGNAL, run_supervised
from stages.config import Addresses, PipelineConfig, private_dir
from stages.exits import EXIT_CANNOT_START
from stages.manifest import Manifest, pick_batch_size
from stages.metrics import IoUAccumulator

QUEUED, AT_PREPROCESS, AT_EXECUTOR, AT_POSTPROCESS = "queued", "preprocess", "executor", "post"
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER_S = 30.0           # a child that lived this long restarts without backoff
RATE_WINDOW_S = 10.0
TERM_GRACE_S = 5.0
CHECK_EVERY_S = 0.1             # supervision and stall checks
HANDOFF_WINDOW_S = 1.0          # a dying child's hand-offs this recent may not have got out


class PipelineError(RuntimeError):
    """The pipeline cannot run (a child cannot start); the message says which and why."""


class StartInterrupted(RuntimeError):
    """start() was asked to stop (a signal) before every child had started; all stopped."""


@dataclass
class Pending:
    request: wire.Request
    where: str = QUEUED
    worker: int | None = None          # preprocess worker index while AT_PREPROCESS
    moved_by: tuple[str, int] | None = None  # the child whose message last moved it on
    since: float = field(default_factory=time.monotonic)     # last progress
    submitted: float = field(default_factory=time.monotonic)
    origin: Any = None                 # who asked (the daemon keeps client identities here)


@dataclass
class ChildSlot:
    """One supervised child: which stage and index, its current process, its counters."""

    stage: str
    index: int
    target: Callable[..., None]
    process: multiprocessing.process.BaseProcess | None = None
    started: float = 0.0
    last_beat: float | None = None
    failures: int = 0                  # consecutive short lives
    restart_at: float | None = None
    restarts: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    past: collections.Counter = field(default_factory=collections.Counter)  # dead lives' totals
    fatal: str | None = None

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.index}"


def bind(sock: zmq.Socket, addr: str, cfg: PipelineConfig) -> None:
    """Bind an internal socket, or raise PipelineError naming the address and the flag
    that chose it (ZeroMQ's own error names neither)."""
    try:
        sock.bind(addr)
    except zmq.ZMQError as exc:
        why = f"cannot listen at {addr}: {zmq.strerror(exc.errno)}"  # (pyzmq's repeats addr)
        if cfg.transport == "tcp":
            why += (f" (--transport tcp uses ports {cfg.tcp_ports} on {cfg.tcp_host}; "
                    "choose another --tcp-base-port)")
        raise PipelineError(why) from exc


class Streamer:
    """PULL -> PUSH forwarding in a thread (zmq.proxy: no Python per message)."""

    def __init__(self, ctx: zmq.Context, name: str, bind_in: str, bind_out: str,
                 cfg: PipelineConfig) -> None:
        self.ctx, self.name = ctx, name
        self.control_addr = f"inproc://streamer-{name}-{id(self)}"
        self.control = ctx.socket(zmq.PAIR)       # TERMINATE -> proxy
        self.control.bind(self.control_addr)
        self.frontend = ctx.socket(zmq.PULL)      # <- stage before
        self.frontend.setsockopt(zmq.LINGER, 0)
        bind(self.frontend, bind_in, cfg)
        self.backend = ctx.socket(zmq.PUSH)       # -> stage after
        self.backend.setsockopt(zmq.LINGER, 0)
        bind(self.backend, bind_out, cfg)
        self.thread = threading.Thread(target=self._run, name=f"streamer-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        steer = self.ctx.socket(zmq.PAIR)
        steer.connect(self.control_addr)
        try:
            zmq.proxy_steerable(self.frontend, self.backend, None, steer)
        except zmq.ContextTerminated:
            pass
        finally:
            steer.close(0)
            self.frontend.close(0)
            self.backend.close(0)

    def stop(self) -> None:
        self.control.send(b"TERMINATE")
        self.thread.join(timeout=5)
        self.control.close(0)


class Pipeline:
    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.log = structlog.get_logger().bind(component="front")
        self.manifest = Manifest.read(cfg.model_dir)
        batch = pick_batch_size(self.manifest, cfg.batch_size)
        self.max_inflight = cfg.max_inflight or max(64, 4 * batch * len(cfg.devices))
        self.pending: dict[str, Pending] = {}
        self.queue: collections.deque[str] = collections.deque()
        self.credits: dict[bytes, int] = {}
        self.children: list[ChildSlot] = []
        self.metrics = IoUAccumulator(self.manifest.num_classes)
        self.totals: collections.Counter = collections.Counter()
        self.answered_at: collections.deque[float] = collections.deque()
        self.remote: dict[tuple[str, int, int], tuple[float, dict[str, float]]] = {}
        self._next_check = 0.0
        self.started = False
        self._own_run_dir = cfg.run_dir is None
        self._mp = multiprocessing.get_context("spawn")

    # ---- start -------------------------------------------------------------------------

    def start(self, interrupted: Callable[[], bool] | None = None) -> None:
        """Bind, spawn every child, and wait until each has reported once. `interrupted` is
        asked on each pass of that wait (a child that keeps crashing makes it long): when
        true, every child is stopped and StartInterrupted raised."""
        self.run_dir = private_dir(self.cfg.resolved_run_dir())
        self.addrs = Addresses.for_config(self.cfg, self.run_dir)
        self.ctx = zmq.Context()
        self.streamers = []
        try:
            self.prep = self.ctx.socket(zmq.ROUTER)  # requests -> preprocess DEALERs, credits in
            self.prep.setsockopt(zmq.LINGER, 0)
            self.prep.setsockopt(zmq.ROUTER_MANDATORY, 1)
            bind(self.prep, self.addrs.prep, self.cfg)
            self.results = self.ctx.socket(zmq.PULL)  # answers, progress, heartbeats <- children
            self.results.setsockopt(zmq.LINGER, 0)
            bind(self.results, self.addrs.results, self.cfg)
            for name, bind_in, bind_out in (
                    ("images", self.addrs.images_in, self.addrs.images_out),
                    ("outputs", self.addrs.outputs_in, self.addrs.outputs_out)):
                self.streamers.append(Streamer(self.ctx, name, bind_in, bind_out, self.cfg))
        except PipelineError:
            for streamer in self.streamers:
                streamer.stop()
            self.ctx.destroy(linger=0)
            if self._own_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self.children = (
            [ChildSlot("preprocess", i, preprocess.main)
             for i in range(self.cfg.preprocess_workers)]
            + [ChildSlot("executor", i, executor.main) for i in range(len(self.cfg.devices))]
            + [ChildSlot("postprocess", i, postprocess.main)
               for i in range(self.cfg.postprocess_workers)]
        )
        self.started = True
        atexit.register(self._stop_children_at_exit)
        try:
            self.log.info("starting", run_dir=str(self.run_dir), addresses=vars(self.addrs),
                          backend=self.cfg.backend, devices=list(self.cfg.devices),
                          children=[c.name for c in self.children])
            for child in self.children:
                self._spawn(child)
            deadline = time.monotonic() + self.cfg.start_timeout_s
            while any(c.last_beat is None for c in self.children):
                if interrupted is not None and interrupted():
                    raise StartInterrupted("stopped during start-up")
                self.poll(100)
                if time.monotonic() > deadline:
                    late = [c.name for c in self.children if c.last_beat is None]
                    raise PipelineError(f"not started within {self.cfg.start_timeout_s:.0f} "
                                        f"s: {', '.join(late)}")
            self.log.info("started", pids={c.name: c.process.pid for c in self.children})
        except BaseException:
            self.close(drain=False)          # whatever ended it, no child outlives the start
            raise

    def _spawn(self, child: ChildSlot) -> None:
        # by name: the stage's imports (torch...) then run after its signals are set
        child.process = self._mp.Process(
            target=run_supervised, name=f"pspnet-{child.name}", daemon=True,
            args=(child.target.__module__, child.target.__qualname__, self.cfg, self.addrs,
                  child.index))
        child.process.start()
        child.started = time.monotonic()
        child.last_beat = None
        child.restart_at = None
        child.counters = {}
        self.log.info("child started", child=child.name, pid=child.process.pid,
                      restarts=child.restarts)

    # ---- the in-process API ------------------------------------------------------------

    def __enter__(self) -> Pipeline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(drain=exc[0] is None)

    def submit(self, request: wire.Request, origin: Any = None) -> bool:
        """Queue one request; False if its id is already pending (ids must be unique)."""
        if request.id in self.pending:
            return False
        self.pending[request.id] = Pending(request, origin=origin)
        self.queue.append(request.id)
        self.totals["submitted"] += 1
        return True

    def run(self, requests: Iterable[wire.Request], backlog: int | None = None,
            ) -> Iterator[wire.Result]:
        """Stream requests through and yield each answer as it comes (not in order)."""
        backlog = backlog or 2 * self.max_inflight
        source = iter(requests)
        exhausted = False
        while True:
            while not exhausted and len(self.pending) < backlog:
                request = next(source, None)
                if request is None:
                    exhausted = True
                else:
                    self.submit(request)
            if exhausted and not self.pending:
                return
            for result, _origin in self.poll(50)[0]:
                yield result

    @property
    def inflight(self) -> int:
        return len(self.pending) - len(self.queue)

    # ---- one pass of the loop ----------------------------------------------------------

    def poll(self, timeout_ms: float, extra: Sequence[zmq.Socket] = (),
             ) -> tuple[list[tuple[wire.Result, Any]], list[zmq.Socket]]:
        """Dispatch, wait up to timeout_ms for messages, supervise; return the answers."""
        answers: list[tuple[wire.Result, Any]] = []
        self._dispatch()
        poller = zmq.Poller()
        for sock in (self.prep, self.results, *extra):
            poller.register(sock, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        if self.prep in ready:
            self._read_credits()
        if self.results in ready:
            self._read_results(answers)
        now = time.monotonic()
        if now >= self._next_check:           # once per CHECK_EVERY_S, not per message
            self._next_check = now + CHECK_EVERY_S
            self._supervise(answers)
            self._check_stalls(answers)
        self._dispatch()
        return answers, [s for s in extra if s in ready]

    def _dispatch(self) -> None:
        while self.queue and self.inflight < self.max_inflight:
            worker = next((w for w, n in self.credits.items() if n > 0), None)
            if worker is None:
                return
            rid = self.queue.popleft()
            item = self.pending[rid]
            try:
                self.prep.send_multipart([worker, *wire.encode(item.request)])
            except zmq.ZMQError:             # that worker is gone (ROUTER_MANDATORY)
                self.credits.pop(worker, None)
                self.queue.appendleft(rid)
                continue
            self.credits[worker] -= 1
            item.where, item.worker, item.since = AT_PREPROCESS, _worker_index(worker), \
                time.monotonic()

    def _read_credits(self) -> None:
        while True:
            try:
                identity, *frames = self.prep.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                ready = wire.decode_as(frames, wire.Ready)
            except wire.WireError as exc:
                self._warn_malformed("prep", exc)
                continue
            self.credits[identity.bytes] = self.credits.get(identity.bytes, 0) + ready.credits
            for rid in ready.done:
                item = self.pending.get(rid)
                if item is not None and item.where == AT_PREPROCESS:
                    item.where, item.worker, item.since = AT_EXECUTOR, None, time.monotonic()
                    item.moved_by = ("preprocess", ready.worker)

    def _read_results(self, answers: list[tuple[wire.Result, Any]]) -> None:
        while True:
            try:
                frames = self.results.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = wire.decode(frames)
            except wire.WireError as exc:
                self._warn_malformed("results", exc)
                if exc.request_id in self.pending:
                    self._answer(answers, wire.Result(
                        exc.request_id, 0, wire.ERROR, self.pending[exc.request_id].request.path,
                        error=f"internal message malformed: {exc}", stage="front"))
                continue
            if isinstance(msg, wire.Result):
                self._answer(answers, msg)
            elif isinstance(msg, wire.Progress):
                for rid in msg.ids:
                    item = self.pending.get(rid)
                    if item is not None and item.where in (AT_PREPROCESS, AT_EXECUTOR):
                        item.where, item.since = AT_POSTPROCESS, time.monotonic()
                        item.moved_by = (msg.stage, msg.index)
            elif isinstance(msg, wire.Stats):
                self._heartbeat(msg)

    def _answer(self, answers: list[tuple[wire.Result, Any]], result: wire.Result) -> None:
        item = self.pending.pop(result.id, None)
        if item is None:
            self.totals["duplicates_dropped"] += 1
            return
        if item.where == QUEUED:
            try:
                self.queue.remove(result.id)
            except ValueError:
                pass
        self.totals["ok" if result.status == wire.OK else "errors"] += 1
        if result.status == wire.OK and result.areas is not None:
            self.metrics.add(result.areas)
        now = time.monotonic()
        self.answered_at.append(now)
        while self.answered_at and self.answered_at[0] < now - RATE_WINDOW_S:
            self.answered_at.popleft()
        if result.status != wire.OK:
            self.log.info("request failed", id=result.id, path=result.path, stage=result.stage,
                          error=result.error)
        answers.append((result, item.origin))

    def _heartbeat(self, stats: wire.Stats) -> None:
        child = self._child(stats.stage, stats.index)
        if child is None:                        # a worker started elsewhere (`pspnet worker`)
            self.remote[(stats.stage, stats.index, stats.pid)] = (time.monotonic(),
                                                                  dict(stats.counters))
            return
        if child.process is None or child.process.pid != stats.pid:
            return                               # a previous life's last words
        if stats.fatal:
            child.fatal = stats.fatal
            return
        child.last_beat = time.monotonic()
        child.counters = dict(stats.counters)

    # ---- supervision -------------------------------------------------------------------

    def _supervise(self, answers: list[tuple[wire.Result, Any]]) -> None:
        now = time.monotonic()
        for child in self.children:
            proc = child.process
            if proc is None:
                if child.restart_at is not None and now >= child.restart_at:
                    self._spawn(child)
                continue
            stale = (child.last_beat is not None
                     and now - child.last_beat > self.cfg.heartbeat_timeout_s)
            if stale and proc.exitcode is None:
                self.log.warning("child silent, killing", child=child.name, pid=proc.pid,
                                 silent_s=round(now - child.last_beat, 1))
                _kill(proc.pid, signal.SIGKILL)
                proc.join(5)
            if proc.exitcode is None:
                continue
            self._child_died(child, answers)

    def _child_died(self, child: ChildSlot, answers: list[tuple[wire.Result, Any]]) -> None:
        proc = child.process
        code = proc.exitcode
        lived = time.monotonic() - child.started
        # drain what it said before dying (a fatal reason, its last answers)
        self._read_results(answers)
        if code == EXIT_CANNOT_START or child.fatal:
            reason = child.fatal or f"exit status {code}"
            self.log.error("child cannot start", child=child.name, error=reason)
            self.close(drain=False)
            raise PipelineError(f"{child.name} cannot start: {reason}")
        child.past.update({k: v for k, v in child.counters.items()
                           if k in ("processed", "errors", "batches", "filler", "busy_s",
                                    "cpu_s")})
        child.counters = {}
        child.process = None
        child.restarts += 1
        self.totals["restarts"] += 1
        child.failures = 0 if lived > STABLE_AFTER_S else child.failures + 1
        delay = RESTART_BACKOFF_S[min(child.failures, len(RESTART_BACKOFF_S) - 1)]
        child.restart_at = time.monotonic() + delay
        self.log.warning("child died", child=child.name, pid=proc.pid, exitcode=code,
                         lived_s=round(lived, 1), restart_in_s=delay)
        if child.stage == "executor":
            self._read_credits()        # images it may hold whose "done" was still queued
        lost = self._held_by(child)
        # Its data and its hand-off note leave on different sockets: killed in between, the
        # note may be out and the data not. Retry what it handed on just before dying (a
        # duplicate answer is dropped; a request stuck until the stall timeout is worse).
        # Only first attempts: a suspect is more likely fine than lost, so it must not use
        # up a request's last chance (the stall timeout still covers it).
        recent = max(child.started, time.monotonic() - HANDOFF_WINDOW_S - CHECK_EVERY_S)
        held = set(lost)
        lost += [rid for rid, p in self.pending.items()
                 if p.moved_by == (child.stage, child.index) and p.since >= recent
                 and p.where != QUEUED and p.request.attempt == 0 and rid not in held]
        if child.stage == "preprocess":
            for identity in [w for w in self.credits if _worker_index(w) == child.index]:
                del self.credits[identity]
        for rid in lost:
            self._retry(rid, f"{child.name} died (exit status {code})", answers)

    def _held_by(self, child: ChildSlot) -> list[str]:
        if child.stage == "preprocess":
            return [rid for rid, p in self.pending.items()
                    if p.where == AT_PREPROCESS and p.worker == child.index]
        where = AT_EXECUTOR if child.stage == "executor" else AT_POSTPROCESS
        return [rid for rid, p in self.pending.items() if p.where == where]

    def _retry(self, rid: str, reason: str, answers: list[tuple[wire.Result, Any]]) -> None:
        item = self.pending[rid]
        if item.request.attempt >= 1:
            self._answer(answers, wire.Result(
                rid, item.request.attempt, wire.ERROR, item.request.path,
                error=f"given up after a retry: {reason}", stage="front"))
            return
        self.totals["retried"] += 1
        item.request = wire.Request(item.request.id, item.request.path, item.request.ann,
                                    item.request.attempt + 1)
        item.where, item.worker, item.since = QUEUED, None, time.monotonic()
        self.queue.appendleft(rid)

    def _check_stalls(self, answers: list[tuple[wire.Result, Any]]) -> None:
        limit = time.monotonic() - self.cfg.stall_timeout_s
        for rid in [r for r, p in self.pending.items() if p.where != QUEUED and p.since < limit]:
            self._retry(rid, f"no progress for {self.cfg.stall_timeout_s:.0f} s", answers)

    def _child(self, stage: str, index: int) -> ChildSlot | None:
        return next((c for c in self.children if c.stage == stage and c.index == index), None)

    def _warn_malformed(self, where: str, exc: wire.WireError) -> None:
        self.totals["malformed"] += 1
        self.log.warning("malformed message dropped", socket=where, error=str(exc))

    # ---- status and shutdown -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        stages: dict[str, dict[str, float]] = {}
        for child in self.children:
            s = stages.setdefault(child.stage, {"processes": 0, "alive": 0, "processed": 0,
                                                "errors": 0, "queue": 0, "restarts": 0,
                                                "busy_s": 0.0, "cpu_s": 0.0, "pids": []})
            s["processes"] += 1
            if child.process is not None:
                s["pids"].append(child.process.pid)
            s["alive"] += int(child.process is not None and child.process.exitcode is None)
            s["restarts"] += child.restarts
            for key in ("processed", "errors", "queue", "busy_s", "cpu_s"):
                s[key] += child.counters.get(key, 0) + child.past.get(key, 0)
        now = time.monotonic()
        recent = [t for t in self.answered_at if t >= now - RATE_WINDOW_S]
        return {
            "stages": stages,
            "front": {"queued": len(self.queue), "inflight": self.inflight,
                      "cpu_s": time.process_time(),
                      **{k: self.totals.get(k, 0) for k in
                         ("submitted", "ok", "errors", "retried", "restarts",
                          "duplicates_dropped", "malformed", "abandoned")}},
            "remote": [{"stage": stage, "index": index, "pid": pid,
                        "seen_s_ago": round(now - seen, 1), **counters}
                       for (stage, index, pid), (seen, counters) in self.remote.items()
                       if now - seen < 10 * self.cfg.heartbeat_timeout_s],
            "images_per_s": round(len(recent) / RATE_WINDOW_S, 2),
            "metrics": self.metrics.summary() if self.metrics.images else None,
        }

    def abandon(self, reason: str) -> list[tuple[wire.Result, Any]]:
        """Answer every pending request with the error `reason` (stopping without them):
        each is still answered exactly once, and later answers for them are dropped."""
        answers = [(wire.Result(rid, item.request.attempt, wire.ERROR, item.request.path,
                                error=reason, stage="front"), item.origin)
                   for rid, item in self.pending.items()]
        self.pending.clear()
        self.queue.clear()
        self.totals["errors"] += len(answers)
        self.totals["abandoned"] += len(answers)
        return answers

    def drain(self, timeout_s: float) -> list[tuple[wire.Result, Any]]:
        """Answer everything pending (or give up at the deadline); return those answers."""
        answers: list[tuple[wire.Result, Any]] = []
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            answers.extend(self.poll(50)[0])
        return answers

    def close(self, drain: bool = True, timeout_s: float = 60.0) -> None:
        if not self.started:
            return
        if drain:
            self.drain(timeout_s)
        self.started = False
        atexit.unregister(self._stop_children_at_exit)
        procs = [c.process for c in self.children if c.process is not None]
        for proc in procs:                    # 1. ask (they ignore SIGTERM: see stages.child)
            if proc.exitcode is None:
                _kill(proc.pid, STOP_SIGNAL)
        deadline = time.monotonic() + TERM_GRACE_S
        for proc in procs:                    # 2. wait, then insist
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                _kill(proc.pid, signal.SIGKILL)
                proc.join(5)
        for streamer in self.streamers:       # 3. sockets and threads
            streamer.stop()
        self.prep.close(0)
        self.results.close(0)
        self.ctx.term()
        if self._own_run_dir:                 # 4. the private socket directory
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.log.info("stopped", **{k: self.totals.get(k, 0) for k in ("ok", "errors")})

    def _stop_children_at_exit(self) -> None:
        """The interpreter exits with this pipeline open (an exception skipped close):
        multiprocessing's own exit hook would SIGTERM the children, which ignore it, and
        then wait for them for ever. Stop them as close() does."""
        for child in self.children:
            if child.process is not None and child.process.exitcode is None:
                _kill(child.process.pid, STOP_SIGNAL)


def _worker_index(identity: bytes) -> int:
    return int(identity.split(b"-")[1])


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def requests_for(paths: Iterable[str | Path], anns: Iterable[str | None] | None = None,
                 ) -> list[wire.Request]:
    """Requests with ids 0..n-1 for a list of paths (and optional ground truths)."""
    anns = list(anns) if anns is not None else None
    return [wire.Request(str(i), str(Path(p)),
                         None if anns is None or anns[i] is None else str(anns[i]))
            for i, p in enumerate(paths)]
