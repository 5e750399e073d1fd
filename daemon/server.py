"""`pspnet serve`: the supervisor loop around the pipeline, its clients and its signals.

One loop, the same steps each pass: handle recorded signals, let the pipeline dispatch,
supervise and collect answers, answer clients, feed the watched folder. Signal handlers
only record the signal. The first SIGTERM/SIGINT stops intake and drains (every accepted
request is answered, the partial batch flushed), writes the final metrics, exits 0; a
second one exits at once.
"""

from __future__ import annotations

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

from daemon.cli import json_safe
from daemon.client import DUPLICATE_ID
from daemon.endpoint import is_local
from daemon.watch import Record, Watcher
from stages import wire
from stages.config import PipelineConfig
from stages.pipeline import Pipeline, PipelineError

EXIT_OK, EXIT_FORCED, EXIT_CANNOT_START = 0, 1, 3
LOOP_MS = 50
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

    # signal handlers only record
    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def serve(self) -> int:
        cfg = self.cfg
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.log.info("config", endpoint=cfg.endpoint, model=str(cfg.pipeline.model_dir),
                      backend=cfg.pipeline.backend, devices=list(cfg.pipeline.devices),
                      out=str(cfg.pipeline.out_dir), watch=str(cfg.watch) if cfg.watch else None,
                      preprocess=cfg.pipeline.preprocess_workers,
                      postprocess=cfg.pipeline.postprocess_workers,
                      batch_size=cfg.pipeline.batch_size, max_queue=cfg.max_queue,
                      allow_roots=[str(p) for p in cfg.allow_roots])
        self.pipeline = Pipeline(cfg.pipeline)
        try:
            self.pipeline.start()
        except PipelineError as exc:
            self.log.error("cannot start", error=str(exc))
            return EXIT_CANNOT_START

        self.ctx = zmq.Context()
        self.frontend = self.ctx.socket(zmq.ROUTER)   # clients' DEALERs <-> daemon
        self.frontend.setsockopt(zmq.LINGER, 0)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a gone client's answers drop
        self.frontend.setsockopt(zmq.MAXMSGSIZE, MAX_CLIENT_FRAME_BYTES)
        umask = os.umask(0o077)                   # the ipc socket file is 0600 from birth
        try:
            self.frontend.bind(cfg.endpoint)
        finally:
            os.umask(umask)
        if cfg.endpoint.startswith("ipc://"):
            os.chmod(cfg.endpoint[len("ipc://"):], 0o600)
        if cfg.watch is not None:
            self._start_watch()
        self.log.info("serving", endpoint=cfg.endpoint)
        try:
            code = self._loop()
        except PipelineError as exc:
            self.log.error("pipeline failed", error=str(exc))
            code = EXIT_CANNOT_START
        self._shutdown(drain=code == EXIT_OK)
        return code

    def _loop(self) -> int:
        while True:
            if self.signals:
                signum = self.signals.pop(0)
                if self.stopping:
                    self.log.warning("second signal, exiting now", signal=signum)
                    return EXIT_FORCED
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
            if self.stopping and (not self.pipeline.pending
                                  or time.monotonic() > self.drain_deadline):
                return EXIT_OK

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

    def _deliver(self, result: wire.Result, origin: Any) -> None:
        if isinstance(origin, bytes):
            self._send(origin, result)
        name = self.watched.pop(result.id, None)
        if name is not None and self.record is not None:
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

    def _shutdown(self, drain: bool) -> None:
        final = self.status()
        if self.watcher is not None:
            self.watcher.stop()
        self.pipeline.close(drain=False)
        self.frontend.close(0)
        self.ctx.term()
        if self.record is not None:
            self.record.close()
        if self.cfg.metrics_json is not None:
            tmp = self.cfg.metrics_json.with_suffix(".tmp")
            tmp.write_text(json.dumps(json_safe(final), indent=2) + "\n")
            tmp.replace(self.cfg.metrics_json)
        self.log.info("exit", drained=drain, ok=final["front"]["ok"],
                      errors=final["front"]["errors"], metrics=final["metrics"])
        sys.stderr.flush()


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def check_exposure(endpoint: str, allow_roots: tuple[Path, ...]) -> str | None:
    """A daemon reachable from other hosts must be told which folders it may read."""
    if not is_local(endpoint) and not allow_roots:
        return (f"{endpoint} is reachable from other hosts: pass --allow-root DIR for the "
                "folders clients may name")
    return None
