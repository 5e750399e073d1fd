"""`pspnet serve`: the supervisor loop around the pipeline, its clients and its signals.

The client socket is bound first (a taken or malformed endpoint fails before any child
starts). Then one loop, the same steps each pass: handle recorded signals, let the pipeline
dispatch, supervise and collect answers, answer clients, feed the watched folder. Signal
handlers only record the signal. The first SIGTERM/SIGINT stops intake and drains (every
accepted request is answered, the partial batch flushed), writes the final metrics, exits
0; a second one, or --drain-timeout running out, exits 1 at once, after answering what is
left with an error. A signal during start-up stops the children and exits 1.
"""

from __future__ import annotations

import errno
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

from daemon.client import DUPLICATE_ID, Client, DaemonUnavailable
from daemon.endpoint import (
    LISTENING,
    NOT_A_SOCKET,
    PROBE_TIMEOUT_S,
    STALE,
    EndpointLocked,
    ipc_state,
    is_local,
    lock_file,
    lock_socket_file,
    parse_endpoint,
    unlock_socket_file,
)
from daemon.watch import Record, Watcher
from stages import wire
from stages.config import PipelineConfig
from stages.exits import EXIT_CANNOT_START, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from stages.logs import json_safe
from stages.pipeline import Pipeline, PipelineError, StartInterrupted

LOOP_MS = 50
ANSWER_LINGER_MS = 2000      # on exit, the last answers may take this long to leave
# A client message is one msgpack header (no array frames): a peer announcing a bigger frame
# is disconnected by ZeroMQ before it is buffered (by default it would allocate whatever
# size the peer claims and sends).
MAX_CLIENT_FRAME_BYTES = wire.MAX_HEADER_BYTES
WARN_EVERY_S = 60.0          # malformed messages: one warning per sender per minute,
WARN_LINES_PER_MIN = 20      # at most this many per minute over all senders,
WARN_SENDERS_KEPT = 4096     # and a bounded memory of senders


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
        self.record: Record | None = None
        self.watcher: Watcher | None = None
        self.watched: dict[str, str] = {}     # request id -> file name (watch mode)
        self._warned: dict[bytes, float] = {}   # sender -> last warning (monotonic)
        self._warn_lines: list[float] = []      # every warning line in the last minute
        self._warn_suppressed = 0
        self.frontend: zmq.Socket | None = None
        self._socket: tuple[Path, int, int] | None = None  # our ipc socket file, dev, inode
        self._lock: tuple[Path, int] | None = None   # that file's path, our lock's descriptor
        self._removed_stale: Path | None = None
        self.stop_reason: str | None = None     # set when exiting before the drain finished

    # signal handlers only record
    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def serve(self) -> int:
        """Claim the endpoint, start the children, serve until a signal. The exit status:
        0 drained, 1 stopped early (second signal, --drain-timeout ran out, a signal during
        start-up), 2 endpoint unusable (nothing started), 3 a child cannot start."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        problem = self._bind()          # before any child: a bad or taken endpoint fails fast
        if problem is not None:
            self._release_endpoint()
            sys.stderr.write(f"pspnet serve: error: {problem}\n")
            sys.stderr.flush()
            return EXIT_USAGE
        try:
            return self._run()
        finally:
            self._release_endpoint()

    def _run(self) -> int:
        cfg = self.cfg
        self.log.info("config", endpoint=cfg.endpoint, model=str(cfg.pipeline.model_dir),
                      backend=cfg.pipeline.backend, devices=list(cfg.pipeline.devices),
                      out=str(cfg.pipeline.out_dir), watch=str(cfg.watch) if cfg.watch else None,
                      preprocess=cfg.pipeline.preprocess_workers,
                      postprocess=cfg.pipeline.postprocess_workers,
                      batch_size=cfg.pipeline.batch_size, max_queue=cfg.max_queue,
                      drain_timeout_s=cfg.drain_timeout_s,
                      allow_roots=[str(p) for p in cfg.allow_roots],
                      transport=cfg.pipeline.transport)
        pipe = cfg.pipeline
        if pipe.transport == "tcp" and not ipaddress.ip_address(pipe.tcp_host).is_loopback:
            self.log.warning("internal ports open to the network, without authentication",
                             host=pipe.tcp_host,
                             ports=pipe.tcp_ports)
        if self._removed_stale is not None:
            self.log.info("removed a stale socket file", path=str(self._removed_stale))
        self.pipeline = Pipeline(cfg.pipeline)
        try:
            self.pipeline.start(interrupted=lambda: bool(self.signals))
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

    def _bind(self) -> str | None:
        """Bind the client socket; or say in one line why not. An ipc socket file that a
        live process listens on is refused (ZeroMQ would silently take the path over and
        leave that daemon unreachable); one nobody listens on is left from a crash: removed."""
        cfg = self.cfg
        try:
            target = parse_endpoint(cfg.endpoint)
        except ValueError as exc:
            return str(exc)
        path = target.socket_file
        if path is not None:
            try:
                self._lock = (path, lock_socket_file(path))
            except EndpointLocked as exc:     # a daemon that answers is named as such
                return _in_use(cfg.endpoint, path, otherwise=f"{cfg.endpoint}: {exc}")
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    return f"cannot listen at {cfg.endpoint}: no directory {path.parent}"
                if exc.errno == errno.ELOOP:
                    return (f"cannot listen at {cfg.endpoint}: {lock_file(path)} is a "
                            "symbolic link; not writing through it")
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    return f"cannot listen at {cfg.endpoint}: {lock_file(path)}: " \
                           f"{exc.strerror}"
                # not ours to lock (another user's, a read-only folder): the checks below
                # and the bind say what is there, as they did before the lock existed
            state = ipc_state(path)
            if state == LISTENING:
                return _in_use(cfg.endpoint, path)
            if state == NOT_A_SOCKET:
                return f"{path} exists and is not a socket: not replacing it"
            if state == STALE:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    return f"cannot remove the stale socket file {path}: {exc.strerror}"
                self._removed_stale = path
        self.ctx = zmq.Context()
        self.frontend = self.ctx.socket(zmq.ROUTER)   # clients' DEALERs <-> daemon
        self.frontend.setsockopt(zmq.LINGER, ANSWER_LINGER_MS)  # last answers get out
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a gone client's answers drop
        self.frontend.setsockopt(zmq.MAXMSGSIZE, MAX_CLIENT_FRAME_BYTES)
        umask = os.umask(0o077)                   # the ipc socket file is 0600 from birth
        try:
            self.frontend.bind(cfg.endpoint)
        except zmq.ZMQError as exc:
            self.frontend.close(0)
            self.ctx.term()
            self.frontend = None
            if exc.errno == zmq.EADDRINUSE:
                return _in_use(cfg.endpoint, None)
            return f"cannot listen at {cfg.endpoint}: {exc.strerror}"
        finally:
            os.umask(umask)
        if path is not None:
            os.chmod(path, 0o600)
            st = os.stat(path)
            self._socket = (path, st.st_dev, st.st_ino)
        return None

    def _release_endpoint(self) -> None:
        """Close the client socket (answers already sent get ANSWER_LINGER_MS to leave) and
        remove our ipc socket file: only ours, should another daemon have taken the path."""
        if self.frontend is not None:
            self.frontend.close()
            self.ctx.term()
            self.frontend = None
        if self._socket is not None:
            path, dev, ino = self._socket
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    path.unlink()
            except FileNotFoundError:
                pass
        if self._lock is not None:          # last: the next serve finds the path free
            unlock_socket_file(*self._lock)
            self._lock = None

    def _loop(self) -> int:
        while True:
            if self.signals:
                signum = self.signals.pop(0)
                if self.stopping:
                    self.log.warning("second signal, exiting now", signal=signum,
                                     pending=len(self.pipeline.pending))
                    self.stop_reason = "daemon stopped before this request finished (a " \
                                       "second signal: exit at once)"
                    return EXIT_FAILED
                self.log.info("signal, draining", signal=signal.Signals(signum).name,
                              pending=len(self.pipeline.pending))
                self.stopping = True
                self.drain_deadline = time.monotonic() + self.cfg.drain_timeout_s
                if self.watcher is not None:
                    self.watcher.stop()
            answers, ready = self.pipeline.poll(LOOP_MS, extra=[self.frontend])
            for result, origin in answers:
                self._deliver(result, origin)
            if ready:
                self._read_clients()
            if self.watcher is not None and not self.stopping:
                self._feed_watch()
            if self.stopping and not self.pipeline.pending:
                return EXIT_OK
            if self.stopping and time.monotonic() > self.drain_deadline:
                self.log.warning("drain timeout ran out", drain_timeout_s=self.cfg.drain_timeout_s,
                                 pending=len(self.pipeline.pending))
                self.stop_reason = ("daemon stopped before this request finished "
                                    f"(--drain-timeout {self.cfg.drain_timeout_s:g} s ran out)")
                return EXIT_FAILED

    # ---- clients -----------------------------------------------------------------------

    def _read_clients(self) -> None:
        while True:
            try:
                identity, *frames = self.frontend.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            client = identity.bytes
            try:
                msg = wire.decode(frames, max_submit=1024)
            except wire.WireError as exc:
                self.pipeline.totals["malformed"] += 1
                self._rate_limited_warning(client, str(exc))
                ids = (exc.request_id,) if exc.request_id else ()
                self._send(client, wire.Reply("error", ids, f"malformed message: {exc}"))
                continue
            if isinstance(msg, wire.StatusQuery):
                self._send(client, wire.Reply("status", body=self.status()))
            elif isinstance(msg, wire.Submit):
                self._accept(client, msg.requests)
            else:
                self._send(client, wire.Reply("error", message=f"unexpected {type(msg).__name__}"))

    def _accept(self, client: bytes, requests: tuple[wire.Request, ...]) -> None:
        ids = tuple(r.id for r in requests)
        if self.stopping:
            self._send(client, wire.Reply("error", ids, "daemon is shutting down"))
            return
        room = max(0, self.cfg.max_queue - len(self.pipeline.pending))
        if len(requests) > room:
            # Take what fits, in order, and say `busy` for the rest: all-or-nothing would
            # starve a client sending big chunks behind one that sends small ones.
            self.pipeline.totals["busy_replies"] += 1
            self._send(client, wire.Reply("busy", ids[room:], "queue full, retry later"))
            requests = requests[:room]
            if not requests:
                return
        refused, accepted = [], []
        for r in requests:
            problem = self._refuse(r)
            if problem is None and not self.pipeline.submit(
                    wire.Request(r.id, r.path, r.ann), origin=client):
                problem = DUPLICATE_ID              # the client may resend after a restart
            (refused if problem else accepted).append((r, problem))
        if accepted:
            self._send(client, wire.Reply("accepted", tuple(r.id for r, _ in accepted)))
        for r, problem in refused:
            self.pipeline.totals["refused"] += 1
            self._send(client, wire.Result(r.id, 0, wire.ERROR, r.path, error=problem,
                                           stage="front"))

    def _refuse(self, r: wire.Request) -> str | None:
        if not os.path.isabs(r.path) or (r.ann is not None and not os.path.isabs(r.ann)):
            return "paths must be absolute"
        if self.cfg.allow_roots:
            for p in (r.path, r.ann):
                if p is not None and not _inside(Path(p), self.cfg.allow_roots):
                    return f"path outside the allowed input roots: {p}"
        return None

    def _send(self, client: bytes, msg: wire.Message) -> None:
        try:
            self.frontend.send_multipart([client, *wire.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass                                  # client gone or stuck: never block the loop

    def _deliver(self, result: wire.Result, origin: Any, record: bool = True) -> None:
        """To its client, and (watch mode, `record`) into the record of processed files."""
        if isinstance(origin, bytes):
            self._send(origin, result)
        name = self.watched.pop(result.id, None)
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
        self._submit_watched(self.watcher.poll())

    def _submit_watched(self, paths: list[Path]) -> None:
        for path in paths:
            rid = f"watch-{uuid.uuid4().hex[:12]}"
            self.watched[rid] = path.name
            self.pipeline.submit(wire.Request(rid, str(path.absolute())))

    # ---- status and shutdown -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        doc = self.pipeline.status()
        doc["daemon"] = {"pid": os.getpid(), "endpoint": self.cfg.endpoint,
                         "stopping": self.stopping, "watch": str(self.cfg.watch or "") or None,
                         "busy_replies": self.pipeline.totals.get("busy_replies", 0),
                         "refused": self.pipeline.totals.get("refused", 0)}
        return doc

    def _shutdown(self) -> None:
        """Answer what is still pending (an exit before the drain finished), stop the
        children, write the final metrics. Every accepted request is answered once."""
        abandoned = self._abandon() if self.stop_reason else 0
        final = self.status()
        final["daemon"].update(drained=not self.stop_reason, abandoned=abandoned)
        if self.watcher is not None:
            self.watcher.stop()
        self.pipeline.close(drain=False)
        if self.record is not None:
            self.record.close()
        if self.cfg.metrics_json is not None:
            tmp = self.cfg.metrics_json.with_suffix(".tmp")
            tmp.write_text(json.dumps(json_safe(final), indent=2) + "\n")
            tmp.replace(self.cfg.metrics_json)
        self.log.info("exit", drained=not self.stop_reason, abandoned=abandoned,
                      reason=self.stop_reason, ok=final["front"]["ok"],
                      errors=final["front"]["errors"], metrics=final["metrics"])
        sys.stderr.flush()

    def _abandon(self) -> int:
        """Answer every pending request with an error saying why the daemon stopped without
        it. Watched files are not recorded, so the next start processes them."""
        answers = self.pipeline.abandon(self.stop_reason)
        for result, origin in answers:
            self._deliver(result, origin, record=False)
        if answers:
            self.log.warning("answered unfinished requests as errors", count=len(answers),
                             reason=self.stop_reason)
        return len(answers)


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def _in_use(endpoint: str, path: Path | None, otherwise: str | None = None) -> str:
    """Why the endpoint is taken, naming the daemon there when it answers a status query;
    else `otherwise`, if given."""
    if parse_endpoint(endpoint).host == "*":
        return f"cannot listen at {endpoint}: the port is in use"
    pid = None
    try:
        with Client(endpoint) as client:
            daemon = client.status(timeout_s=PROBE_TIMEOUT_S).get("daemon")
        if isinstance(daemon, dict):
            pid = daemon.get("pid")
    except (DaemonUnavailable, ValueError, zmq.ZMQError, wire.WireError):
        pass                                      # not a daemon of ours, or a silent one
    if pid is not None:
        return f"a daemon (pid {pid}) already answers at {endpoint}"
    if otherwise is not None:
        return otherwise
    where = f"on {path}" if path is not None else "there"
    return (f"{endpoint} is in use: something listens {where} but gave no status within "
            f"{PROBE_TIMEOUT_S:g} s (another program, or a daemon still starting)")


def check_exposure(endpoint: str, allow_roots: tuple[Path, ...]) -> str | None:
    """A malformed endpoint is refused; a daemon reachable from other hosts must be told
    which folders it may read."""
    try:
        local = is_local(endpoint)
    except ValueError as exc:
        return str(exc)
    if not local and not allow_roots:
        return (f"{endpoint} is reachable from other hosts: pass --allow-root DIR for the "
                "folders clients may name")
    return None
