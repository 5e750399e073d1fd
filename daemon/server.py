"""`pspnet serve`: the daemon's one loop around the front, its clients and its signals.

The client endpoint is claimed first (a taken or malformed endpoint fails before any
worker starts), then the workers start. Then one loop, the same steps each pass: act on
recorded signals, wait on the workers' and the clients' sockets, read each (a bounded
number of messages, so neither side can hold the loop), supervise, deliver answers, feed
the watched folder, dispatch, check the drain. Signal handlers only record the signal.
The first SIGTERM, SIGINT or SIGHUP stops intake and drains (every accepted request is
answered, the partial batch flushed), writes the final metrics, exits 0; a second one, or
--drain-timeout running out, exits 1 at once, after answering what is left with an error.
A signal during start-up stops the workers and exits 1. One client's bad message, or one
request that cannot be handled, costs that message or request an error answer, never
the daemon.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import zmq

from pspnet.core import wire
from pspnet.core.config import PipelineConfig
from pspnet.core.exits import EXIT_CANNOT_START, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from pspnet.core.logs import json_safe
from pspnet.core.status import DaemonStatus, Status
from pspnet.daemon.clients import Clients, refusal
from pspnet.daemon.door import Door
from pspnet.daemon.endpoint import is_local
from pspnet.daemon.exporter import Exporter
from pspnet.daemon.front import Front, PipelineError, StartInterrupted
from pspnet.daemon.watch import Record, StorageError, Version, Watcher

LOOP_MS = 50
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WATCH = "watch"              # the origin of watched files' requests
RECORD_RETRY_S = 1.0         # a record that cannot be written is tried again this often


@dataclass(frozen=True)
class ServeConfig:
    pipeline: PipelineConfig
    endpoint: str
    watch: Path | None = None
    max_queue: int = 1024                    # accepted but unanswered; beyond: "busy"
    drain_timeout_s: float = 120.0
    metrics_json: Path | None = None
    allow_roots: tuple[Path, ...] = field(default_factory=tuple)
    metrics_port: int | None = None          # Prometheus /metrics; None: not served
    metrics_host: str = "127.0.0.1"


class Server:
    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.log = structlog.get_logger().bind(component="supervisor")
        self.signals: list[int] = []
        self.stopping = False
        self.drain_deadline = 0.0
        self.record: Record | None = None
        self.watcher: Watcher | None = None
        self.watched: dict[str, tuple[str, Version]] = {}   # request id -> file, version
        self._record_retry_at = 0.0
        self.door = Door(cfg.endpoint)
        self.exporter = Exporter(cfg.metrics_port, cfg.metrics_host)
        self.failure: str | None = None         # a thread of the front died: why
        self.stop_reason: str | None = None     # set when exiting before the drain finished

    # signal handlers only record
    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def serve(self) -> int:
        """Claim the endpoint, start the workers, serve until a signal. The exit status:
        0 drained, 1 stopped early (second signal, --drain-timeout ran out, a signal during
        start-up, a thread of the front died), 2 endpoint unusable (nothing started),
        3 a worker cannot start."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        problem = self.door.claim()        # before any worker: a bad endpoint fails fast
        if problem is not None:
            sys.stderr.write(f"pspnet serve: error: {problem}\n")
            sys.stderr.flush()
            return EXIT_USAGE
        try:
            return self._run()
        finally:
            self.exporter.close()
            self.door.release()

    def _run(self) -> int:
        cfg, pipe = self.cfg, self.cfg.pipeline
        self.log.info("config", endpoint=cfg.endpoint, model=str(pipe.model_dir),
                      backend=pipe.backend, devices=list(pipe.devices),
                      out=str(pipe.out_dir), watch=str(cfg.watch) if cfg.watch else None,
                      preprocess=pipe.preprocess_workers, postprocess=pipe.postprocess_workers,
                      batch_size=pipe.batch_size, max_queue=cfg.max_queue,
                      drain_timeout_s=cfg.drain_timeout_s,
                      liveness_timeout_s=pipe.liveness_timeout_s,
                      allow_roots=[str(p) for p in cfg.allow_roots], transport=pipe.transport,
                      client_connections_cap=self.door.cap)
        if pipe.transport == "tcp" and not ipaddress.ip_address(pipe.tcp_host).is_loopback:
            self.log.warning("internal ports open to the network, without authentication",
                             host=pipe.tcp_host, port=pipe.tcp_ports)
        if self.door.removed_stale is not None:
            self.log.info("removed a stale socket file", path=str(self.door.removed_stale))
        problem = self.exporter.listen()           # before any worker, like the endpoint
        if problem is not None:
            sys.stderr.write(f"pspnet serve: error: {problem}\n")
            return EXIT_USAGE
        self.front = Front(pipe, around_spawn=self.door.reserve)
        self.front.on_answer = self.exporter.answered
        try:
            self.front.start(interrupted=lambda: bool(self.signals))
        except StartInterrupted:
            self.log.warning("signal during start-up: children stopped, exiting; nothing was "
                             "served", signal=signal.Signals(self.signals[0]).name)
            return EXIT_FAILED
        except PipelineError as exc:
            self.log.error("cannot start", error=str(exc))
            return EXIT_CANNOT_START
        self.clients = Clients(self.door.socket, self.front, cfg.max_queue, cfg.allow_roots,
                               self.status)
        if cfg.watch is not None:
            self._start_watch()
        self.log.info("serving", endpoint=cfg.endpoint, metrics=self.exporter.address)
        try:
            code = self._loop()
        except PipelineError as exc:
            self.log.error("pipeline failed", error=str(exc))
            self.stop_reason = f"the daemon failed: {exc}"
            code = EXIT_CANNOT_START
        if not self._shutdown() and code == EXIT_OK:
            code = EXIT_FAILED                # the drain went well, the metrics file not
        return code

    # ---- the loop ----------------------------------------------------------------------

    def _loop(self) -> int:
        front, clients = self.front, self.clients
        poller = zmq.Poller()
        poller.register(front.control, zmq.POLLIN)   # workers: notes, answers, heartbeats
        poller.register(clients.socket, zmq.POLLIN)  # clients: submits, status queries
        while True:
            code = self._handle_signals()
            if code is not None:
                return code
            ready = dict(poller.poll(LOOP_MS))
            clients.new_turn()
            if front.control in ready:
                front.read()
            if clients.socket in ready:
                clients.read()
            front.supervise()
            self._check_threads()
            for result, origin in front.take_answers():
                self._deliver(result, origin)
            try:
                self._feed_watch()
            except Exception as exc:            # a watch bug stops intake, loudly, not serve
                self.log.exception("watch intake failed")
                self._fail(f"watch intake failed: {type(exc).__name__}: {exc}")
            front.dispatch()
            self.exporter.refresh(self.status)
            code = self._drain_check()
            if code is not None:
                return code

    def _handle_signals(self) -> int | None:
        while self.signals:
            signum = self.signals.pop(0)
            name = signal.Signals(signum).name
            if self.stopping:
                self.log.warning("second signal, exiting now", signal=name,
                                 pending=self.front.pending)
                self.stop_reason = "daemon stopped before this request finished (a " \
                                   "second signal: exit at once)"
                return EXIT_FAILED
            self.log.info("signal, draining", signal=name, pending=self.front.pending)
            self._begin_drain()
        return None

    def _begin_drain(self) -> None:
        self.stopping = self.clients.stopping = True
        self.drain_deadline = time.monotonic() + self.cfg.drain_timeout_s
        if self.watcher is not None:
            self.watcher.stop()

    def _drain_check(self) -> int | None:
        if not self.stopping:
            return None
        if not self.front.pending:
            return EXIT_OK if self.failure is None else EXIT_FAILED
        if time.monotonic() > self.drain_deadline:
            self.log.warning("drain timeout ran out", drain_timeout_s=self.cfg.drain_timeout_s,
                             pending=self.front.pending)
            self.stop_reason = ("daemon stopped before this request finished "
                                f"(--drain-timeout {self.cfg.drain_timeout_s:g} s ran out)")
            return EXIT_FAILED
        return None

    def _check_threads(self) -> None:
        """A thread of the front that died stops the daemon (drained, exit 1), loudly."""
        if self.failure is not None:
            return
        dead = None
        if not self.door.monitor_alive:
            dead = "the client connection monitor thread died"
        elif self.watcher is not None and not self.stopping and not self.watcher.alive:
            dead = f"the watch thread died: {self.watcher.error or 'no error recorded'}"
        if dead is not None:
            self._fail(dead)

    def _fail(self, why: str) -> None:
        """Part of the front failed: drain what was accepted, then exit 1."""
        self.failure = why
        self.log.error("a part of the front failed; draining and exiting", error=why)
        if not self.stopping:
            self._begin_drain()

    # ---- answers and watch mode ---------------------------------------------------------

    def _deliver(self, result: wire.Result, origin: Any, record: bool = True) -> None:
        """To its client, and (watch mode, `record`) into the record of processed files."""
        if isinstance(origin, bytes):
            self.clients.send(origin, result)
        watched = self.watched.pop(result.id, None) if origin == WATCH else None
        if watched is None or not record or self.record is None:
            return
        name, version = watched
        self._record(name, version=list(version), id=result.id, status=result.status,
                     mask=result.mask, error=result.error, cause=result.cause,
                     attempt=result.attempt, final=result.cause is None)
        self.watcher.answered(name, version, result.cause)

    def _record(self, name: str, **fields: Any) -> None:
        """Into the record; a storage failure keeps the line queued (written with the next
        write that works) and is logged once, not per line."""
        try:
            self.record.add(name, **fields)
        except StorageError as exc:
            self._record_failing(exc)
        else:
            self._record_works()

    def _record_works(self) -> None:
        if self._record_retry_at:
            self.log.info("the watch record can be written again")
            self._record_retry_at = 0.0

    def _record_failing(self, exc: StorageError) -> None:
        if not self._record_retry_at:
            self.log.warning("cannot write the watch record; keeping its lines until it "
                             "can (a kill now would make their images be redone)",
                             error=str(exc), record=str(self.record.path))
        self._record_retry_at = time.monotonic() + RECORD_RETRY_S

    def _start_watch(self) -> None:
        out_dir = self.cfg.pipeline.out_dir
        self.record = Record(out_dir)
        self.watcher = Watcher(self.cfg.watch, self.record, out_dir)
        self.watcher.start()
        final = sum(1 for e in self.record.entries.values() if e.get("final", True))
        self.log.info("watching", folder=str(self.cfg.watch), recorded=len(self.record.entries),
                      final=final, torn_lines=self.record.torn,
                      share_of_queue=self.watch_share)

    @property
    def watch_share(self) -> int:
        """Watched files may hold at most half of --max-queue: the rest is for clients,
        so a backlog of files never keeps a client's image out."""
        return max(1, self.cfg.max_queue // 2)

    def _feed_watch(self) -> None:
        watcher = self.watcher
        if watcher is None or self.stopping:
            return
        if self._record_retry_at and time.monotonic() >= self._record_retry_at:
            try:
                self.record.flush()
            except StorageError as exc:
                self._record_failing(exc)
            else:
                self._record_works()
        for event, fields in watcher.notices:
            self.log.warning(event, **fields)
        watcher.notices.clear()
        for name, version, mask in watcher.recovered:
            self.log.info("mask already written; recorded without redoing it", file=name)
            self._record(name, version=list(version), status=wire.OK, mask=mask,
                         recovered=True, final=True)
        watcher.recovered.clear()
        room = self.watch_share - len(self.watched)
        if room <= 0:
            return
        for path, version in watcher.take(room):
            problem = refusal(wire.Request("watch", str(path)), self.cfg.allow_roots)
            if problem is not None:             # e.g. a link out of the allowed roots
                self.log.info("request failed", path=str(path), stage="front", error=problem)
                self._record(path.name, version=list(version), status=wire.ERROR,
                             error=problem, final=True)
                watcher.answered(path.name, version, None)
                continue
            rid = f"watch-{uuid.uuid4().hex[:12]}"
            self.watched[rid] = (path.name, version)
            self.front.submit(wire.Request(rid, str(path)), origin=WATCH)

    # ---- status and shutdown -----------------------------------------------------------

    def status(self) -> Status:
        status = self.front.status()
        status.front.malformed += self.clients.counts["malformed"]    # workers' and clients'
        status.daemon = DaemonStatus(
            **self.clients.counts, pid=os.getpid(), endpoint=self.cfg.endpoint,
            stopping=self.stopping, watch=str(self.cfg.watch or "") or None,
            client_connections=self.door.state.connections,
            accepting_connections=self.door.state.open, client_connections_cap=self.door.cap)
        return status

    def _write_metrics(self, final: Status) -> bool:
        """--metrics-json, atomically; a storage failure is logged, never a traceback."""
        tmp = self.cfg.metrics_json.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(json_safe(final.document()), indent=2) + "\n")
            tmp.replace(self.cfg.metrics_json)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self.log.error("cannot write --metrics-json", path=str(self.cfg.metrics_json),
                           error=exc.strerror or str(exc))
            return False
        return True

    def _shutdown(self) -> bool:
        """Answer what is still pending (an exit before the drain finished), stop the
        workers, write the final metrics (False: they could not be written). Every
        accepted request is answered once."""
        abandoned = self._abandon() if self.stop_reason else 0
        final = self.status()
        final.daemon.drained = not self.stop_reason
        final.daemon.abandoned, final.daemon.failure = abandoned, self.failure
        if self.watcher is not None:
            self.watcher.stop()
        self.front.close()
        if self.record is not None:
            self.record.close()
        written = self.cfg.metrics_json is None or self._write_metrics(final)
        self.log.info("exit", drained=not self.stop_reason, abandoned=abandoned,
                      reason=self.stop_reason or self.failure, ok=final.front.ok,
                      errors=final.front.errors, metrics=final.metrics)
        sys.stderr.flush()
        return written

    def _abandon(self) -> int:
        """Answer every pending request with an error saying why the daemon stopped without
        it. Watched files are not recorded, so the next start processes them."""
        answers = self.front.abandon(self.stop_reason)
        for result, origin in answers:
            self._deliver(result, origin, record=False)
        if answers:
            self.log.warning("answered unfinished requests as errors", count=len(answers),
                             reason=self.stop_reason)
        return len(answers)


def check_exposure(endpoint: str, allow_roots: tuple[Path, ...]) -> str | None:
    """A malformed endpoint is refused; a daemon reachable by others must be told which
    folders it may read (other hosts over tcp; other local users on an abstract ipc name,
    which has no file permissions)."""
    try:
        local = is_local(endpoint)
    except ValueError as exc:
        return str(exc)
    if not local and not allow_roots:
        if endpoint.startswith("ipc://@"):
            return (f"{endpoint} is an abstract socket that every local user can reach: "
                    "pass --allow-root DIR for the folders clients may name, or use an ipc "
                    "path (its file permissions keep others out)")
        return (f"{endpoint} is reachable from other hosts: pass --allow-root DIR for the "
                "folders clients may name")
    return None
