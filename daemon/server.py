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

from daemon.door import Door
from daemon.endpoint import is_local
from daemon.front import Front, PipelineError, StartInterrupted
from daemon.watch import Record, Watcher
from stages import wire
from stages.config import PipelineConfig
from stages.exits import EXIT_CANNOT_START, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from stages.logs import json_safe

LOOP_MS = 50
CLIENT_READS_PER_TURN = 64   # per loop turn; ROUTER queues fairly between clients
                             # (a status flood's replies share one document per turn)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WARN_EVERY_S = 60.0          # malformed messages: one warning per sender per minute,
WARN_LINES_PER_MIN = 20      # at most this many per minute over all senders,
WARN_SENDERS_KEPT = 4096     # and a bounded memory of senders
WATCH = "watch"              # the origin of watched files' requests


@dataclass(frozen=True)
class ServeConfig:
    pipeline: PipelineConfig
    endpoint: str
    watch: Path | None = None
    max_queue: int = 1024                    # accepted but unanswered; beyond: "busy"
    drain_timeout_s: float = 120.0
    metrics_json: Path | None = None
    allow_roots: tuple[Path, ...] = field(default_factory=tuple)


class Server:
    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.log = structlog.get_logger().bind(component="supervisor")
        self.signals: list[int] = []
        self.stopping = False
        self.drain_deadline = 0.0
        self.record: Record | None = None
        self.watcher: Watcher | None = None
        self.watched: dict[str, str] = {}     # watch request id -> file name
        self.door = Door(cfg.endpoint)
        self.counts: dict[str, int] = {"busy_replies": 0, "refused": 0, "malformed": 0,
                                       "client_errors": 0, "bytes_in": 0, "bytes_out": 0}
        self._warned: dict[bytes, float] = {}   # sender -> last warning (monotonic)
        self._warn_lines: list[float] = []      # every warning line in the last minute
        self._warn_suppressed = 0
        self._status: list[Any] | None = None   # encoded status reply, until anything moves
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
        self.front = Front(pipe, around_spawn=self.door.reserve)
        try:
            self.front.start(interrupted=lambda: bool(self.signals))
        except StartInterrupted:
            self.log.warning("signal during start-up: children stopped, exiting; nothing was "
                             "served", signal=signal.Signals(self.signals[0]).name)
            return EXIT_FAILED
        except PipelineError as exc:
            self.log.error("cannot start", error=str(exc))
            return EXIT_CANNOT_START
        if cfg.watch is not None:
            self._start_watch()
        self.log.info("serving", endpoint=cfg.endpoint)
        try:
            code = self._loop()
        except PipelineError as exc:
            self.log.error("pipeline failed", error=str(exc))
            self.stop_reason = f"the daemon failed: {exc}"
            code = EXIT_CANNOT_START
        self._shutdown()
        return code

    # ---- the loop ----------------------------------------------------------------------

    def _loop(self) -> int:
        front, clients = self.front, self.door.socket
        poller = zmq.Poller()
        poller.register(front.control, zmq.POLLIN)   # workers: notes, answers, heartbeats
        poller.register(clients, zmq.POLLIN)         # clients: submits, status queries
        while True:
            code = self._handle_signals()
            if code is not None:
                return code
            ready = dict(poller.poll(LOOP_MS))
            self._status = None                      # anything may have moved since
            if front.control in ready:
                front.read()
            if clients in ready:
                self._read_clients()
            front.supervise()
            self._check_threads()
            for result, origin in front.take_answers():
                self._deliver(result, origin)
            self._feed_watch()
            front.dispatch()
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
        self.stopping = True
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
            self.failure = dead
            self.log.error("a thread of the front died; draining and exiting", error=dead)
            if not self.stopping:
                self._begin_drain()

    # ---- clients -----------------------------------------------------------------------

    def _read_clients(self) -> None:
        for _ in range(CLIENT_READS_PER_TURN):
            try:
                identity, *frames = self.door.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.counts["bytes_in"] += len(identity) + sum(len(f) for f in frames)
            client = identity.bytes
            try:
                self._client_message(client, frames)
            except Exception as exc:        # one message costs an error answer, not the daemon
                self._status = None
                self.counts["client_errors"] += 1
                self.log.exception("client message not handled", client=client.hex())
                self._send(client, wire.Reply("error", message=f"internal error: {exc}"))

    def _client_message(self, client: bytes, frames: list[zmq.Frame]) -> None:
        try:
            msg = wire.decode(frames, max_submit=1024)
        except wire.WireError as exc:
            self._status = None
            self.counts["malformed"] += 1
            self._rate_limited_warning(client, str(exc))
            ids = (exc.request_id,) if exc.request_id else ()
            self._send(client, wire.Reply("error", ids, f"malformed message: {exc}"))
            return
        if isinstance(msg, wire.StatusQuery):
            self._send_frames(client, self._status_frames())
            return
        self._status = None                          # a reply after this one sees it
        if isinstance(msg, wire.Submit):
            self._accept(client, msg.requests)
        else:
            self._send(client, wire.Reply("error", message=f"unexpected {type(msg).__name__}"))

    def _accept(self, client: bytes, requests: tuple[wire.Request, ...]) -> None:
        ids = tuple(r.id for r in requests)
        if self.stopping:
            self._send(client, wire.Reply("error", ids, "daemon is shutting down"))
            return
        room = max(0, self.cfg.max_queue - self.front.pending)
        if len(requests) > room:
            # Take what fits, in order, and say `busy` for the rest: all-or-nothing would
            # starve a client sending big chunks behind one that sends small ones.
            self.counts["busy_replies"] += 1
            self._send(client, wire.Reply("busy", ids[room:], "queue full, retry later"))
            requests = requests[:room]
            if not requests:
                return
        accepted: list[str] = []
        for r in requests:
            try:
                problem = self._admit(client, r)
            except Exception as exc:        # e.g. a path the checks choke on
                self.log.exception("request not handled", id=r.id)
                problem = f"internal error: {type(exc).__name__}: {exc}"
            if problem is None:
                accepted.append(r.id)
            elif problem == REPEAT_ELSEWHERE:
                self._send(client, wire.Reply(
                    "error", (r.id,), f"request id {r.id} is already in use for another "
                                      "image; its first request stays"))
            else:
                self.counts["refused"] += 1
                self._send(client, wire.Result(r.id, 0, wire.ERROR, r.path, error=problem,
                                               stage="front"))
        if accepted:
            self._send(client, wire.Reply("accepted", tuple(accepted)))

    def _admit(self, client: bytes, r: wire.Request) -> str | None:
        """None: accepted (a repeat of a pending id for the same image is the same
        request: one answer); else why not."""
        pending = self.front.ledger.find(client, r.id)
        if pending is not None:
            same = (pending.request.path, pending.request.ann) == (r.path, r.ann)
            return None if same else REPEAT_ELSEWHERE
        problem = refusal(r, self.cfg.allow_roots)
        if problem is None:
            self.front.submit(wire.Request(r.id, r.path, r.ann), origin=client)
        return problem

    def _status_frames(self) -> list[Any]:
        """A flood of status queries costs one document per loop turn: the reply is
        built again only once anything has moved (a new turn, another message)."""
        if self._status is None:
            self._status = wire.encode(wire.Reply("status", body=json_safe(self.status())))
        return self._status

    def _send(self, client: bytes, msg: wire.Message) -> None:
        self._send_frames(client, wire.encode(msg))

    def _send_frames(self, client: bytes, frames: list[Any]) -> None:
        try:
            self.door.socket.send_multipart([client, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:
            return                              # client gone or stuck: never block the loop
        self.counts["bytes_out"] += len(client) + sum(len(f) for f in frames)

    def _deliver(self, result: wire.Result, origin: Any, record: bool = True) -> None:
        """To its client, and (watch mode, `record`) into the record of processed files."""
        if isinstance(origin, bytes):
            self._send(origin, result)
        name = self.watched.pop(result.id, None) if origin == WATCH else None
        if name is not None and record and self.record is not None:
            self.record.add(name, id=result.id, status=result.status, mask=result.mask,
                            error=result.error, attempt=result.attempt)

    def _rate_limited_warning(self, client: bytes, error: str) -> None:
        """One line per sender per minute, at most WARN_LINES_PER_MIN lines a minute in all
        (a flood from fresh connections, each a new sender, cannot flood the log)."""
        now = time.monotonic()
        if now - self._warned.get(client, -1e9) <= WARN_EVERY_S:
            return
        self._warn_lines = [t for t in self._warn_lines if now - t <= 60.0]
        if len(self._warn_lines) >= WARN_LINES_PER_MIN:
            self._warn_suppressed += 1
            return
        if len(self._warned) >= WARN_SENDERS_KEPT:
            self._warned = {c: t for c, t in self._warned.items() if now - t <= WARN_EVERY_S}
            if len(self._warned) >= WARN_SENDERS_KEPT:
                self._warned.clear()
        self._warned[client] = now
        self._warn_lines.append(now)
        self.log.warning("malformed client message", client=client.hex(), error=error,
                         suppressed=self._warn_suppressed)
        self._warn_suppressed = 0

    # ---- watch mode --------------------------------------------------------------------

    def _start_watch(self) -> None:
        out_dir = self.cfg.pipeline.out_dir
        self.record = Record(out_dir)
        self.watcher = Watcher(self.cfg.watch, self.record)
        present = self.watcher.start()
        self.log.info("watching", folder=str(self.cfg.watch), present=len(present),
                      already_processed=len(self.record.done))
        self._submit_watched(present)

    def _feed_watch(self) -> None:
        if self.watcher is not None and not self.stopping:
            self._submit_watched(self.watcher.poll())

    def _submit_watched(self, paths: list[Path]) -> None:
        for path in paths:
            rid = f"watch-{uuid.uuid4().hex[:12]}"
            self.watched[rid] = path.name
            self.front.submit(wire.Request(rid, str(path.absolute())), origin=WATCH)

    # ---- status and shutdown -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        doc = self.front.status()
        doc["front"]["malformed"] += self.counts["malformed"]     # workers' and clients'
        doc["daemon"] = {"pid": os.getpid(), "endpoint": self.cfg.endpoint,
                         "stopping": self.stopping, "watch": str(self.cfg.watch or "") or None,
                         "client_connections": self.door.state.connections,
                         "accepting_connections": self.door.state.open,
                         "client_connections_cap": self.door.cap,
                         **self.counts}
        return doc

    def _shutdown(self) -> None:
        """Answer what is still pending (an exit before the drain finished), stop the
        workers, write the final metrics. Every accepted request is answered once."""
        abandoned = self._abandon() if self.stop_reason else 0
        final = self.status()
        final["daemon"].update(drained=not self.stop_reason, abandoned=abandoned,
                               failure=self.failure)
        if self.watcher is not None:
            self.watcher.stop()
        self.front.close()
        if self.record is not None:
            self.record.close()
        if self.cfg.metrics_json is not None:
            tmp = self.cfg.metrics_json.with_suffix(".tmp")
            tmp.write_text(json.dumps(json_safe(final), indent=2) + "\n")
            tmp.replace(self.cfg.metrics_json)
        self.log.info("exit", drained=not self.stop_reason, abandoned=abandoned,
                      reason=self.stop_reason or self.failure, ok=final["front"]["ok"],
                      errors=final["front"]["errors"], metrics=final["metrics"])
        sys.stderr.flush()

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


REPEAT_ELSEWHERE = "repeat elsewhere"   # _admit: a pending id reused for another image


def refusal(r: wire.Request, allow_roots: tuple[Path, ...]) -> str | None:
    """Why a request is refused at the door, before any file is opened; None: it is not."""
    if not os.path.isabs(r.path) or (r.ann is not None and not os.path.isabs(r.ann)):
        return "paths must be absolute"
    for p in (r.path, r.ann) if allow_roots else ():
        if p is None:
            continue
        resolved = _resolve(p)
        if resolved is None:
            return f"symbolic link loop: {p}"
        if not any(resolved.is_relative_to(root) for root in _roots(allow_roots)):
            return f"path outside the allowed input roots: {p}"
    return None


def _resolve(path: str) -> Path | None:
    """The path with every link followed; None for a link loop (os.path.realpath would
    stop there quietly, Path.resolve raise)."""
    try:
        return Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        return Path(os.path.realpath(path))       # missing: preprocess says so
    except OSError:
        return None                               # ELOOP, or another failure to resolve


def _roots(allow_roots: tuple[Path, ...]) -> list[Path]:
    return [Path(os.path.realpath(root)) for root in allow_roots]


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
