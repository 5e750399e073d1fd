"""`pspnet serve`: start-up, one loop, shutdown.

Start-up claims the client endpoint and the /metrics port before any worker starts (a
taken or malformed one fails in a second, exit 2), then starts the workers (exit 3 if one
cannot) and the watch intake. The loop does the same steps each pass: act on recorded
signals, wait on the workers' and the clients' sockets, read each (a bounded number of
messages, so neither side can hold the loop), supervise, deliver answers, feed the watched
folder, dispatch, check the drain. Signal handlers only record the signal. One client's
bad message, or one request that cannot be handled, costs that message or request an error
answer, never the daemon.

SIGHUP reloads the model from the same directory, live (daemon.reload; `pspnet reload`
does the same for any directory): nothing stops, every accepted request is answered.

Stopping has one deadline. The first SIGTERM or SIGINT closes intake and sets it
--drain-timeout ahead: the drain (every accepted request answered, the partial batch
flushed) may use all of it but the shutdown's reserve (STOP_RESERVE_S, at most half of
it); then what is left is answered with an error saying why. The shutdown is one numbered
sequence bounded by that deadline, run on every exit path: drained, the deadline, a second
signal, a part of the daemon failing, an exception (logged). A second signal, before or
during the shutdown, kills the workers at once (SIGKILL) and leaves the rest of the
sequence HURRY_S. The exit status: 0 drained, 1 stopped early (a second signal, the
deadline, a signal during start-up, a failure), 2 endpoint or port unusable (nothing
started), 3 a worker cannot start.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import zmq

from pspnet.core import wire
from pspnet.core.exits import EXIT_CANNOT_START, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from pspnet.core.logs import json_safe
from pspnet.core.plan import describe
from pspnet.core.status import DaemonStatus, Status
from pspnet.core.uploads import door_frame_limit
from pspnet.daemon.answers import deliver_turn
from pspnet.daemon.clients import Clients
from pspnet.daemon.door import ANSWER_LINGER_MS, Door
from pspnet.daemon.endpoint import forget_daemon, is_local, record_daemon
from pspnet.daemon.exporter import Exporter
from pspnet.daemon.fd_budget import FdBudget
from pspnet.daemon.front import Front, PipelineError, StartInterrupted
from pspnet.daemon.intake import WATCH, WatchIntake
from pspnet.daemon.serve_config import ServeConfig
from pspnet.daemon.supervisor import STOP_ALL_GRACE_S
from pspnet.daemon.upload_budget import UploadBudget

LOOP_MS = 50
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNAL = signal.SIGHUP    # as nginx and gunicorn: read the model directory again
STOP_RESERVE_S = 1.0         # of --drain-timeout, kept for the shutdown's steps
HURRY_S = 0.5                # after a second signal, the shutdown's steps get this long
ANSWERS_LEAVE_S = 0.2        # answers already sent get this long to leave, deadline or not
WATCH_STOP_S = 1.0           # the watch thread's end, waited for at most


class Deadline:
    """Stopping's one deadline: set once (the first signal: --drain-timeout ahead), read
    by the drain and by every shutdown step; `hurry` (a second signal) cuts what is left
    to HURRY_S. Pure bookkeeping: the clock is injectable."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.at: float | None = None            # on the clock; None: not stopping
        self.hurried = False
        self.reserve_s = 0.0                    # the end of it, kept for the shutdown

    def start(self, seconds: float) -> None:
        """From now; a deadline already set stands (a failure during a drain)."""
        if self.at is None:
            self.at = self.clock() + seconds
            self.reserve_s = min(STOP_RESERVE_S, seconds / 2)

    def hurry(self) -> None:
        self.start(HURRY_S)
        self.hurried = True
        self.at = min(self.at, self.clock() + HURRY_S)

    def drain_over(self) -> bool:
        """The drain has had its share: the rest is the shutdown's."""
        return self.at is not None and self.clock() >= self.at - self.reserve_s

    def left(self, cap_s: float) -> float:
        """Seconds a step may take: its own cap, within what is left."""
        return max(0.0, min(cap_s, self.at - self.clock()))


class Server:
    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.log = structlog.get_logger().bind(component="supervisor")
        self.signals: list[int] = []
        self.stopping = False
        self.deadline = Deadline()
        self.fds = FdBudget()           # one budget: the door, /metrics, restarts
        self.door = Door(cfg.endpoint, self.fds, keys_dir=cfg.pipeline.keys_dir,
                         max_frame_bytes=door_frame_limit(cfg.pipeline.max_upload_bytes))
        self.exporter = Exporter(cfg.metrics_port, cfg.metrics_host, self.fds)
        self.front: Front | None = None
        self.clients: Clients | None = None
        self.intake: WatchIntake | None = None
        self.failure: str | None = None         # a part of the daemon failed: why
        self.record: Path | None = None         # this daemon's run file (endpoint.py)
        self.stop_reason: str | None = None     # set when exiting before the drain finished

    # signal handlers only record
    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)       # a stop, or RELOAD_SIGNAL (never a stop)

    def serve(self) -> int:
        """Start-up, the loop, the shutdown (always). The exit status: see the module."""
        for sig in (*STOP_SIGNALS, RELOAD_SIGNAL):
            signal.signal(sig, self._on_signal)
        problem = self.door.claim()        # before any worker: a bad endpoint fails fast
        if problem is not None:            # (nothing was started, nothing is left)
            return _usage_error(problem)
        code = EXIT_FAILED
        try:
            code = self._start_up()
            if code is None:
                code = self._loop()
        except Exception as exc:           # a bug, an OSError from a restart: logged, and
            why = f"{type(exc).__name__}: {exc}"            # the same shutdown follows
            self.log.exception("the daemon failed", error=why)
            _say(f"pspnet serve: error: the daemon failed: {why}")
            self.stop_reason = f"the daemon failed: {why}"
            code = EXIT_CANNOT_START if isinstance(exc, PipelineError) else EXIT_FAILED
        finally:
            written = self._shutdown()
        return EXIT_FAILED if code == EXIT_OK and not written else code

    # ---- start-up ----------------------------------------------------------------------

    def _start_up(self) -> int | None:
        """Serving once this returns None; else the exit status (nothing is served)."""
        cfg, pipe = self.cfg, self.cfg.pipeline
        log_config(self.log, cfg, self.door.cap)
        if self.door.removed_stale is not None:
            self.log.info("removed a stale socket file", path=str(self.door.removed_stale))
        problem = self.exporter.listen()           # before any worker, like the endpoint
        if problem is not None:
            return _usage_error(problem)
        front = Front(pipe, around_spawn=self.fds.reserve)
        front.answers.on_answer = self.exporter.answered
        try:
            front.start(interrupted=lambda: any(s != RELOAD_SIGNAL for s in self.signals))
        except StartInterrupted:
            self.log.warning("signal during start-up: children stopped, exiting; nothing was "
                             "served", signal=signal.Signals(next(
                                 s for s in self.signals if s != RELOAD_SIGNAL)).name)
            return EXIT_FAILED
        except PipelineError as exc:
            self.log.error("cannot start", error=str(exc))
            _say(f"pspnet serve: error: {exc}")     # the reason, besides the log
            return EXIT_CANNOT_START
        self.front = front
        self.clients = Clients(self.door.socket, front, cfg.max_queue, cfg.allow_roots,
                               self.status, UploadBudget(cfg.max_upload_inflight,
                                                         pipe.max_upload_bytes))
        if cfg.watch is not None:
            self.intake = WatchIntake(cfg.watch, pipe.out_dir, front, cfg.max_queue,
                                      cfg.allow_roots)
            self.intake.start()
        self.record = record_daemon(cfg.endpoint)    # for a client that looks elsewhere
        self.log.info("serving", endpoint=cfg.endpoint, metrics=self.exporter.address)
        return None

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
            clients.send_replies(front.reloader.take_replies())   # a reload's outcome
            self._check_parts()
            deliver_turn(front.take_messages(), self.clients.send, self._deliver)
            try:
                if self.intake is not None:
                    self.intake.feed()
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
            if signum == RELOAD_SIGNAL:     # the served directory, read again, swapped live
                self.front.reloader.on_sighup(self.stopping)
                continue
            name = signal.Signals(signum).name
            if self.stopping:
                self.log.warning("second signal, exiting now", signal=name,
                                 pending=self.front.pending)
                self.stop_reason = "daemon stopped before this request finished (a " \
                                   "second signal: exit at once)"
                self.deadline.hurry()
                return EXIT_FAILED
            self.log.info("signal, draining", signal=name, pending=self.front.pending)
            self._begin_drain()
        return None

    def _begin_drain(self) -> None:
        self.stopping = self.clients.stopping = True
        self.front.reloader.stop("the daemon is shutting down")     # a reload under way
        self.deadline.start(self.cfg.drain_timeout_s)
        if self.intake is not None:
            self.intake.stop(WATCH_STOP_S)

    def _drain_check(self) -> int | None:
        if not self.stopping:
            return None
        if not self.front.pending:
            return EXIT_OK if self.failure is None else EXIT_FAILED
        if self.deadline.drain_over():
            self.log.warning("drain timeout ran out", drain_timeout_s=self.cfg.drain_timeout_s,
                             pending=self.front.pending)
            self.stop_reason = ("daemon stopped before this request finished "
                                f"(--drain-timeout {self.cfg.drain_timeout_s:g} s ran out)")
            return EXIT_FAILED
        return None

    def _check_parts(self) -> None:
        """A thread of the daemon that died stops it (drained, exit 1), loudly."""
        if self.failure is not None:
            return
        if not self.door.monitor_alive:
            self._fail("the client connection monitor thread died")
        elif self.intake is not None and self.intake.problem is not None:
            self._fail(self.intake.problem)

    def _fail(self, why: str) -> None:
        """Part of the daemon failed: drain what was accepted, then exit 1."""
        self.failure = why
        self.log.error("a part of the front failed; draining and exiting", error=why)
        if not self.stopping:
            self._begin_drain()

    def _deliver(self, result: wire.Result, origin: Any, record: bool = True) -> None:
        """To its client, or (watch mode) into the record of processed files."""
        if isinstance(origin, bytes):
            self.clients.send(origin, result)
        elif origin == WATCH and self.intake is not None:
            self.intake.answered(result, record)

    def status(self) -> Status:
        return server_status(self)

    # ---- shutdown ----------------------------------------------------------------------

    def _shutdown(self) -> bool:
        """Every exit path ends here, with whatever had started. One deadline bounds the
        steps; a second signal (now or before) cuts it to HURRY_S and kills the workers.
        False: the final metrics could not be written."""
        started = time.monotonic()
        self.deadline.start(min(STOP_RESERVE_S, self.cfg.drain_timeout_s))   # if no drain
        front, intake = self.front, self.intake
        # 1. stop intake: clients are refused, the watched folder is no longer read
        self.stopping = True
        if self.clients is not None:
            self.clients.stopping = True
        if intake is not None:
            intake.stop(self._left(WATCH_STOP_S))
        # 2. answer what is left with an error saying why (not drained: a second signal,
        #    the deadline, a failure); watched files stay unrecorded, so they are redone
        abandoned = self._abandon() if self.stop_reason and front is not None else 0
        # 3. the final status, while the workers are there to be counted
        final = self.status() if front is not None and self.clients is not None else None
        if final is not None:
            final.daemon.drained = not self.stop_reason
            final.daemon.abandoned, final.daemon.failure = abandoned, self.failure
        # 4. stop the workers: STOP_SIGNAL, SIGKILL for any left after the grace or at the
        #    deadline (the earlier), at once after a second signal
        if front is not None:
            front.close(min(self.deadline.at, time.monotonic() + STOP_ALL_GRACE_S),
                        self._hurried)
        # 5. the watch record's last lines, fsync'd
        if intake is not None:
            intake.close(0)
        # 6. --metrics-json, atomically
        written = (final is None or self.cfg.metrics_json is None
                   or write_json(self.cfg.metrics_json, final.document(), self.log))
        # 7. stop serving /metrics (its HTTP loop looks for the stop every 0.5 s)
        self.exporter.close()
        # 8. answers already sent leave; the socket, its file and lock go (the path is free)
        self.door.release(max(ANSWERS_LEAVE_S, self._left(ANSWER_LINGER_MS / 1000)))
        forget_daemon(self.record)
        # 9. say how it ended
        if final is not None:
            self.log.info("exit", drained=not self.stop_reason, abandoned=abandoned,
                          reason=self.stop_reason or self.failure, ok=final.front.ok,
                          errors=final.front.errors, metrics=final.metrics,
                          shutdown_s=round(time.monotonic() - started, 3))
        sys.stderr.flush()
        return written

    def _hurried(self) -> bool:
        """A signal during the shutdown is a second one: the rest gets HURRY_S."""
        if self.signals and not self.deadline.hurried:
            self.log.warning("signal during shutdown: killing the workers, exiting now",
                             signal=signal.Signals(self.signals[0]).name)
            self.deadline.hurry()
        self.signals.clear()
        return self.deadline.hurried

    def _left(self, cap_s: float) -> float:
        self._hurried()
        return self.deadline.left(cap_s)

    def _abandon(self) -> int:
        """Answer every pending request with an error saying why the daemon stopped
        without it. Watched files are not recorded, so the next start processes them."""
        answers = self.front.abandon(self.stop_reason)
        for result, origin in answers:
            self._deliver(result, origin, record=False)
        if answers:
            self.log.warning("answered unfinished requests as errors", count=len(answers),
                             reason=self.stop_reason)
        return len(answers)


def server_status(server: Server) -> Status:
    """The status document: the front's part, the clients', the daemon's."""
    status = server.front.status()
    status.front.malformed += server.clients.counts["malformed"]    # workers' and clients'
    status.daemon = DaemonStatus(
        **server.clients.counts, pid=os.getpid(), endpoint=server.cfg.endpoint,
        stopping=server.stopping, watch=str(server.cfg.watch or "") or None,
        client_connections=server.door.state.connections,
        accepting_connections=server.door.state.open, client_connections_cap=server.door.cap,
        max_upload_bytes=server.cfg.pipeline.max_upload_bytes)
    status.plan = server.cfg.pipeline.plan        # how workers and threads were chosen
    status.ready = status.readiness() is None
    return status


def log_config(log: Any, cfg: ServeConfig, connections_cap: int) -> None:
    """What runs, in one line; and a warning when the internal ports face the network."""
    pipe = cfg.pipeline
    log.info("config", endpoint=cfg.endpoint, model=str(pipe.model_dir), backend=pipe.backend,
             devices=list(pipe.devices), out=str(pipe.out_dir),
             watch=str(cfg.watch) if cfg.watch else None, preprocess=pipe.preprocess_workers,
             postprocess=pipe.postprocess_workers, batch_size=pipe.batch_size,
             max_queue=cfg.max_queue, drain_timeout_s=cfg.drain_timeout_s,
             liveness_timeout_s=pipe.liveness_timeout_s,
             allow_roots=[str(p) for p in cfg.allow_roots], transport=pipe.transport,
             client_connections_cap=connections_cap)
    log.info("plan", plan=describe(pipe.plan))       # workers and threads: how, why
    if pipe.transport == "tcp":
        log.info("internal ports speak CurveZMQ and admit only the worker key",
                 host=pipe.tcp_host, port=pipe.tcp_ports,
                 keys=str(pipe.keys_dir) if pipe.keys_dir else "in memory: own workers only",
                 network=not ipaddress.ip_address(pipe.tcp_host).is_loopback)


def write_json(path: Path, doc: dict[str, Any], log: Any) -> bool:
    """--metrics-json, atomically; a storage failure is logged, never a traceback."""
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(json_safe(doc), indent=2) + "\n")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.error("cannot write --metrics-json", path=str(path), error=exc.strerror or str(exc))
        return False
    return True


def _usage_error(problem: str) -> int:
    _say(f"pspnet serve: error: {problem}")
    return EXIT_USAGE


def _say(line: str) -> None:
    """One plain line on stderr for the user, whatever the log's format."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


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
