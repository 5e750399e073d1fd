"""What every stage process does the same way: start-up, heartbeat, fatal exit.

A child is started by the front with (config, addresses, index), through
`run_supervised`: it ignores SIGINT and SIGTERM, because a Ctrl-C, `timeout` or systemd's
stop reaches the whole process group or cgroup, and the front, draining, still needs its
children; the front stops them itself with STOP_SIGNAL, whose default action ends the
process. A worker started by hand (`pspnet worker`) ignores SIGINT and dies on SIGTERM.
A background thread sends a `Stats` heartbeat once a second on its own socket.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import structlog
import zmq

from stages import wire
from stages.config import PipelineConfig
from stages.exits import EXIT_CANNOT_START
from stages.logs import configure_logging

SEND_LINGER_MS = 2000   # on exit, let queued answers reach the front
STOP_SIGNAL = signal.SIGUSR1   # the front's "stop now" (no handler: the process ends at once)


class Child:
    """Per-process state of one stage worker: its zmq context, counters and heartbeat."""

    def __init__(self, stage: str, index: int, cfg: PipelineConfig, results_addr: str,
                 watch_parent: bool = True) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        configure_logging(cfg.log_level, cfg.log_json, stage=stage, index=index, pid=os.getpid())
        self.stage = stage
        self.index = index
        self.cfg = cfg
        self.results_addr = results_addr
        self.log = structlog.get_logger()
        self.ctx = zmq.Context()
        self.counters: dict[str, float] = {"processed": 0, "errors": 0, "busy_s": 0.0,
                                           "queue": 0}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._gauge: Callable[[], dict[str, float]] | None = None
        self._parent = os.getppid() if watch_parent else None

    def count(self, **deltas: float) -> None:
        with self.lock:
            for key, delta in deltas.items():
                self.counters[key] = self.counters.get(key, 0) + delta

    def set_gauges(self, gauge: Callable[[], dict[str, float]]) -> None:
        """A callable sampled at each heartbeat (e.g. queue depth)."""
        self._gauge = gauge

    def start_heartbeat(self) -> None:
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        sender = self.ctx.socket(zmq.PUSH)          # heartbeat -> front's results PULL
        sender.setsockopt(zmq.LINGER, 0)
        sender.connect(self.results_addr)
        while True:
            with self.lock:
                counters = dict(self.counters)
            counters["cpu_s"] = time.process_time()  # every thread: what the host pays
            if self._gauge is not None:
                counters.update(self._gauge())
            try:
                sender.send_multipart(
                    wire.encode(wire.Stats(self.stage, self.index, os.getpid(), counters)),
                    flags=zmq.NOBLOCK)
            except zmq.Again:
                pass                                 # front busy: the next beat will do
            if self._stop.wait(self.cfg.heartbeat_s):
                break
            if self._parent is not None and os.getppid() != self._parent:
                # the front died (kill -9): so do we. Its stderr may have gone with it (a
                # closed pipe): a failed log line must not end this thread instead.
                with contextlib.suppress(OSError):
                    self.log.warning("front gone, exiting")
                os._exit(1)
        sender.close()

    def fatal(self, message: str) -> None:
        """Tell the front why this child cannot start, then exit with EXIT_CANNOT_START."""
        self.log.error("cannot start", error=message)
        sender = self.ctx.socket(zmq.PUSH)          # one message -> front's results PULL
        sender.setsockopt(zmq.LINGER, SEND_LINGER_MS)
        sender.connect(self.results_addr)
        sender.send_multipart(
            wire.encode(wire.Stats(self.stage, self.index, os.getpid(), {}, fatal=message)))
        sender.close()
        self.ctx.term()
        sys.exit(EXIT_CANNOT_START)


def run_supervised(module: str, name: str, *args: object) -> None:
    """A process the front starts: ignore SIGINT/SIGTERM sent to the whole group before the
    stage's heavy imports (so only the front's STOP_SIGNAL stops it), then run module.name."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    getattr(importlib.import_module(module), name)(*args)


def error_result(request: wire.Request, stage: str, message: str) -> wire.Result:
    return wire.Result(id=request.id, attempt=request.attempt, status=wire.ERROR,
                       path=request.path, error=message, stage=stage)
