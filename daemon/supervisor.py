"""The supervisor: the front's own worker processes, started, watched and restarted.

gunicorn's arbiter is the model. Each worker is a plain process (`python -m pspnet.stages.worker
STAGE INDEX`, its start-up document on stdin), started in plain sight. `check` runs the
same steps each time: reap the dead (restart after a back-off that grows while a worker
keeps dying young), stop the silent and the stuck (STOP_SIGNAL, then SIGKILL after a
grace), start what is due. A worker that cannot start (bad model, missing backend) says
so and exits with EXIT_CANNOT_START: the daemon stops instead of restarting it for ever.
Liveness is the worker's work loop speaking (`heard`), not its pid existing.

A live reload (daemon.reload) adds a second generation of workers beside the first, each
started with its own model's document: one of the new generation that cannot start, or
dies before it was heard, fails the reload (`trial_failures`), not the daemon; the old
generation is then retired (stopped, never restarted, its slots dropped once reaped).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import structlog

from pspnet.core.config import STOP_SIGNAL, PipelineConfig
from pspnet.core.exits import EXIT_CANNOT_START
from pspnet.core.pipeline import PIPELINE, Stage, first_index
from pspnet.core.wire import WorkerId

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER_S = 30.0           # a worker that lived this long restarts without back-off
STOP_GRACE_S = 1.0              # STOP_SIGNAL, then SIGKILL after this
STOP_ALL_GRACE_S = 5.0          # stop_all without a deadline: SIGKILL after this
STOP_POLL_S = 0.02              # stop_all: how often exits (and a hurry) are looked for
KILLED_REAP_S = 1.0             # after SIGKILL, a process in uninterruptible sleep may
                                # take a moment to go; not waited for beyond this


class CannotStart(RuntimeError):
    """A worker cannot start; the message says which and why."""


@dataclass
class Slot:
    """One supervised worker: which stage and index, its current process, its history."""

    stage: Stage
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    heard: float | None = None          # last message from this life; None: not started
    restarts: int = 0
    failures: int = 0                   # consecutive short lives
    restart_at: float | None = None
    stop_sent: float | None = None      # when STOP_SIGNAL went out
    fatal: str | None = None
    generation: int = 0                 # which model it serves (a reload starts the next)
    retiring: bool = False              # stopped for good: its model was replaced

    @property
    def label(self) -> str:
        return f"{self.stage}-{self.index}"

    @property
    def name(self) -> str | None:
        """The current life's name, as the worker calls itself (stage-index-pid)."""
        return None if self.proc is None else str(WorkerId(self.stage, self.index,
                                                            self.proc.pid))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass(frozen=True)
class Death:
    """A worker's life ended: the front retries what it held."""

    slot: Slot
    name: str
    exitcode: int
    lived_s: float
    retired: bool = False               # stopped for good (a reload): not restarted


class Supervisor:
    def __init__(self, cfg: PipelineConfig, start_document: str,
                 around_spawn: Callable[[], AbstractContextManager[None]] = nullcontext,
                 ) -> None:
        self.cfg = cfg
        self.start_document = start_document
        self.around_spawn = around_spawn
        self.log = structlog.get_logger().bind(component="supervisor")
        self.slots = [Slot(spec.stage, i) for spec in PIPELINE for i in range(spec.workers(cfg))]
        self.restarts = 0
        self.documents = {cfg.generation: start_document}   # per generation
        self.trial: int | None = None           # the generation a reload is starting
        self.trial_failures: dict[int, str] = {}  # its generation -> why it cannot start

    def by_pid(self, pid: int) -> Slot | None:
        return next((s for s in self.slots if s.proc is not None and s.proc.pid == pid), None)

    # ---- start and stop --------------------------------------------------------------

    def spawn(self, slot: Slot) -> None:
        # the stage's imports (torch, cv2) happen in the worker, never in the front
        with self.around_spawn():
            slot.proc = subprocess.Popen(
                [sys.executable, "-m", "pspnet.stages.worker", slot.stage, str(slot.index)],
                stdin=subprocess.PIPE, close_fds=True)
        try:
            slot.proc.stdin.write(self.documents[slot.generation].encode())
            slot.proc.stdin.close()
        except OSError:
            pass                                # it died at once: reaped by check()
        slot.started = time.monotonic()
        slot.heard = slot.restart_at = slot.stop_sent = None
        self.log.info("child started", child=slot.label, pid=slot.proc.pid,
                      restarts=slot.restarts)

    def spawn_all(self) -> None:
        for slot in self.slots:
            self.spawn(slot)

    def add_generation(self, cfg: PipelineConfig, start_document: str,
                       stages: tuple[Stage, ...] | None = None) -> list[Slot]:
        """Start a new generation's workers (`cfg.generation`, its own model) beside the
        running ones, of `stages` (default all); they are on trial until `trial` is
        cleared. Executors take their generation's index range (their devices and ipc
        paths follow it); the other stages the lowest indices free."""
        gen = cfg.generation
        self.documents[gen] = start_document
        self.trial = gen
        self.trial_failures.pop(gen, None)
        added = []
        for spec in PIPELINE:
            if stages is not None and spec.stage not in stages:
                continue
            if spec.stage == Stage.EXECUTOR:
                indices = [first_index(spec.stage, cfg) + i for i in range(spec.workers(cfg))]
            else:
                used = {s.index for s in self.slots if s.stage == spec.stage}
                free = (i for i in range(len(used) + spec.workers(cfg)) if i not in used)
                indices = [next(free) for _ in range(spec.workers(cfg))]
            added += [Slot(spec.stage, i, generation=gen) for i in indices]
        self.slots.extend(added)
        for slot in added:
            self.spawn(slot)
        return added

    def adopt(self, old: int, new: int, stages: tuple[Stage, ...]) -> None:
        """The old generation's workers of `stages` serve the new model from now on (the
        same geometry and classes): restarted, they start with its document."""
        for slot in self.of(old):
            if slot.stage in stages and not slot.retiring:
                slot.generation = new

    def retire(self, generation: int, reason: str,
               stages: tuple[Stage, ...] | None = None) -> None:
        """Stop a generation's workers (of `stages`, default all) for good (STOP_SIGNAL,
        SIGKILL after the grace); `check` drops each slot once reaped, and one waiting
        for a restart at once."""
        for slot in self.of(generation):
            if stages is not None and slot.stage not in stages:
                continue
            slot.retiring = True
            if slot.proc is None:
                self.slots.remove(slot)
            else:
                self.stop(slot, reason)
        if not self.of(generation):
            self.documents.pop(generation, None)

    def of(self, generation: int) -> list[Slot]:
        return [s for s in self.slots if s.generation == generation]

    def stop(self, slot: Slot, reason: str) -> None:
        """The polite step: SIGCONT (a stopped process acts on nothing else), then
        STOP_SIGNAL, whose default action ends it; SIGKILL follows in check()."""
        if slot.proc is None or slot.stop_sent is not None or not slot.alive:
            return
        log = self.log.info if slot.retiring else self.log.warning
        log("stopping child", child=slot.label, pid=slot.proc.pid, reason=reason)
        _kill(slot.proc.pid, signal.SIGCONT)
        _kill(slot.proc.pid, STOP_SIGNAL)
        slot.stop_sent = time.monotonic()

    def stop_all(self, until: float | None = None,
                 hurry: Callable[[], bool] | None = None) -> None:
        """Every worker: STOP_SIGNAL, then SIGKILL for those left at `until` (monotonic;
        default STOP_ALL_GRACE_S from now), or at once when `hurry()` says so (the
        daemon's second signal). Each is reaped before this returns."""
        until = time.monotonic() + STOP_ALL_GRACE_S if until is None else until
        hurry = hurry or (lambda: False)
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for proc in procs if not hurry() else ():
            _kill(proc.pid, signal.SIGCONT)     # a stopped process acts on nothing else
            _kill(proc.pid, STOP_SIGNAL)
        while procs:
            procs = [p for p in procs if p.poll() is None]
            if procs and (hurry() or time.monotonic() >= until):
                self._kill_all(procs)
                return
            time.sleep(STOP_POLL_S if procs else 0)

    def _kill_all(self, procs: list[subprocess.Popen]) -> None:
        self.log.warning("killing children (SIGKILL)", pids=[p.pid for p in procs])
        for proc in procs:
            _kill(proc.pid, signal.SIGKILL)
        for proc in procs:
            try:
                proc.wait(KILLED_REAP_S)
            except subprocess.TimeoutExpired:
                self.log.error("child did not exit after SIGKILL", pid=proc.pid)

    # ---- one pass ----------------------------------------------------------------------

    def check(self, now: float, starting: bool = False) -> list[Death]:
        """Reap, stop the silent, kill what did not stop, start what is due. Raises
        CannotStart for a worker that cannot start (and, `starting`, one that did not
        report within the start-up timeout)."""
        deaths = []
        for slot in list(self.slots):
            if slot.proc is None:
                if slot.restart_at is not None and now >= slot.restart_at:
                    self.spawn(slot)
                continue
            code = slot.proc.poll()
            if code is not None:
                deaths.append(self._died(slot, code, now))
                continue
            self._watch(slot, now, starting)
        return deaths

    def _watch(self, slot: Slot, now: float, starting: bool) -> None:
        if slot.stop_sent is not None:
            if now - slot.stop_sent > STOP_GRACE_S:
                _kill(slot.proc.pid, signal.SIGKILL)
            return
        if slot.heard is None:
            if now - slot.started > self.cfg.start_timeout_s:
                why = f"not started within {self.cfg.start_timeout_s:.0f} s"
                if starting:
                    raise CannotStart(f"{slot.label} {why}")
                if slot.generation == self.trial:
                    slot.fatal = why            # the reload fails, the daemon serves on
                self.stop(slot, why)
            return
        silent = now - slot.heard
        if silent > self.cfg.liveness_timeout_s:
            self.stop(slot, f"silent for {silent:.1f} s (--liveness-timeout "
                            f"{self.cfg.liveness_timeout_s:g} s)")

    def _died(self, slot: Slot, code: int, now: float) -> Death:
        name, lived = slot.name, now - slot.started
        if slot.retiring:                       # stopped for good: dropped, not restarted
            self.slots.remove(slot)
            if not self.of(slot.generation):
                self.documents.pop(slot.generation, None)
            self.log.info("child retired", child=slot.label, pid=slot.proc.pid, exitcode=code)
            return Death(slot, name, code, lived, retired=True)
        if slot.generation == self.trial and (code == EXIT_CANNOT_START or slot.fatal
                                              or slot.heard is None):
            why = slot.fatal or f"exit status {code} before it reported"
            self.trial_failures.setdefault(slot.generation, f"{slot.label} cannot start: {why}")
            slot.retiring = True                # the reload retires the rest
            return self._died(slot, code, now)
        if code == EXIT_CANNOT_START or slot.fatal:
            raise CannotStart(f"{slot.label} cannot start: {slot.fatal or f'exit status {code}'}")
        slot.proc = None
        slot.restarts += 1
        self.restarts += 1
        slot.failures = 0 if lived > STABLE_AFTER_S else slot.failures + 1
        delay = RESTART_BACKOFF_S[min(slot.failures, len(RESTART_BACKOFF_S) - 1)]
        slot.restart_at = now + delay
        self.log.warning("child died", child=slot.label, pid=int(name.rsplit("-", 1)[1]),
                         exitcode=code, lived_s=round(lived, 1), restart_in_s=delay)
        return Death(slot, name, code, lived)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass

