"""Shared by the reliability suites (tests/test_reliability_*.py).

* `RawClient`: a DEALER that speaks the wire format itself and keeps every message the
  daemon sends, so a test sees duplicates the library client would hide.
* `MemoryWatch`: resident memory of the daemon and each of its children, from /proc.
* `Daemon`: tests.daemon_helpers.Daemon, optionally started without root's permission
  override (so an unreadable file is unreadable even when the suite runs as root, as CI does),
  or with a lower limit on open files (RLIMIT_NOFILE), as a service manager may set it.
* `linked_stream`: n distinct file names for a few real photos (hard links), with ground truth.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq
from PIL import Image

from stages import wire
from tests import daemon_helpers
from tests.bad_images import palette_ground_truth

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


# ---------------------------------------------------------------------------------------
# memory


def proc_kb(pid: int, key: str = "VmRSS") -> int | None:
    """A /proc/PID/status field in kB (VmRSS, VmHWM), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class MemoryWatch(threading.Thread):
    """Samples VmRSS of the front and every child (pids refreshed from `status`) until
    stopped; `peaks` maps "front" / "preprocess-<pid>" ... to the largest value in MB,
    the sampled RSS or the kernel's high-water mark (VmHWM), whichever is larger."""

    def __init__(self, daemon: daemon_helpers.Daemon, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.daemon_ = daemon
        self.every_s = every_s
        self.peaks: dict[str, float] = {}
        self.samples = 0
        self._halt = threading.Event()
        self._pids: dict[str, int] = {"front": daemon.proc.pid}

    def refresh_pids(self) -> None:
        try:
            stages = self.daemon_.status()["stages"]
        except Exception:  # daemon busy or gone: keep the pids we know
            return
        for stage, s in stages.items():
            for pid in s["pids"]:
                self._pids[f"{stage}-{pid}"] = pid

    def run(self) -> None:
        self.refresh_pids()
        last_refresh = time.monotonic()
        while not self._halt.wait(self.every_s):
            if time.monotonic() - last_refresh > 2.0:
                self.refresh_pids()
                last_refresh = time.monotonic()
            self._sample()

    def _sample(self) -> None:
        self.samples += 1
        for name, pid in list(self._pids.items()):
            for key in ("VmRSS", "VmHWM"):
                kb = proc_kb(pid, key)
                if kb is not None:
                    self.peaks[name] = max(self.peaks.get(name, 0.0), kb / 1024)

    def stop(self) -> dict[str, float]:
        self._sample()
        self._halt.set()
        self.join(5)
        return dict(self.peaks)

    def by_kind(self) -> dict[str, float]:
        """Largest peak per process kind: front, preprocess, executor, postprocess."""
        out: dict[str, float] = {}
        for name, mb in self.peaks.items():
            kind = name.split("-")[0]
            out[kind] = max(out.get(kind, 0.0), mb)
        return out


# ---------------------------------------------------------------------------------------
# a daemon without root's file-permission override


def _drop_dac() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _run_all(steps: list) -> None:  # runs in the child between fork and exec
    for step in steps:
        step()


def permissions_apply_to_daemon() -> bool:
    """True when a daemon started by `Daemon(..., drop_dac=True)` cannot read a mode-000
    file: always for a normal user, and for root when its bounding set can be reduced."""
    if os.geteuid() != 0:
        return True
    probe = subprocess.run(
        [sys.executable, "-c", "import os, tempfile\n"
         "fd, p = tempfile.mkstemp(); os.close(fd); os.chmod(p, 0)\n"
         "try:\n    open(p).close(); print('read')\nexcept PermissionError:\n    print('denied')\n"
         "os.unlink(p)"],
        preexec_fn=_drop_dac, capture_output=True, text=True, timeout=60)
    return probe.stdout.strip() == "denied"


class Daemon(daemon_helpers.Daemon):
    """`pspnet serve` as a process (see tests.daemon_helpers.Daemon). With `drop_dac`, a
    daemon started by root loses CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so file modes apply
    to it as to any user. With `nofile` (soft, hard), it starts with that RLIMIT_NOFILE
    (its children inherit it)."""

    def __init__(self, model: Path, out: Path, tmp: Path, *extra: str, backend: str = "ort",
                 endpoint: str | None = None, drop_dac: bool = False,
                 env: dict[str, str] | None = None,
                 nofile: tuple[int, int] | None = None) -> None:
        self.endpoint = endpoint or f"ipc://{tmp}/front"
        self.log_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        self.metrics = tmp / f"final-metrics-{time.monotonic_ns()}.json"
        cmd = [sys.executable, "-m", "pspnet", "serve", "--model", str(model),
               "--backend", backend, "--out", str(out), "--endpoint", self.endpoint,
               "--metrics-json", str(self.metrics), "--log-format", "json", *extra]
        self.log = open(self.log_path, "w")  # noqa: SIM115
        steps = [_drop_dac] if drop_dac and os.geteuid() == 0 else []
        if nofile is not None:
            steps.append(functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE, nofile))
        preexec = functools.partial(_run_all, steps) if steps else None
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     start_new_session=True, preexec_fn=preexec)

    def tail(self, lines: int = 6) -> str:
        """The last lines of its log, for a failure message."""
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def kill_group(self) -> None:
        """kill -9 the front and every child at once (it runs in its own session), and
        remove the private run directory a killed front leaves: for a test's clean-up,
        where a child may be stopped or the front hung."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.log.close()
        for event in self.events():
            if event.get("event") == "starting" and event.get("run_dir"):
                shutil.rmtree(event["run_dir"], ignore_errors=True)

    def child_pids(self) -> list[int]:
        return [pid for s in self.status()["stages"].values() for pid in s["pids"]]

    def wait_all_alive(self, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if all(s["alive"] == s["processes"] for s in status["stages"].values()):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"children not back: {status['stages']}")
            time.sleep(0.1)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = proc_status_field(pid, "State")
    return state is not None and not state.startswith("Z")


def proc_status_field(pid: int, key: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return line.split(":", 1)[1].strip()
    except FileNotFoundError:
        return None
    return None


def kill9(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------
# a client that sees every frame


class RawClient:
    """Submits over a DEALER and records every reply and result the daemon sends.

    `offer` queues requests; `step` sends the next chunk when the previous one was
    acknowledged (like daemon.client.Client) and reads whatever arrived. Busy chunks go
    back to the front of the backlog after `backoff_s`.
    """

    def __init__(self, endpoint: str, chunk: int = 64, backoff_s: float = 0.1) -> None:
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.chunk, self.backoff_s = chunk, backoff_s
        self.backlog: collections.deque[wire.Request] = collections.deque()
        self.by_id: dict[str, wire.Request] = {}
        self.awaiting: set[str] = set()              # sent, no accepted/busy reply yet
        self.resend_after = 0.0
        self.accepted: set[str] = set()
        self.busy_replies = 0
        self.busy_requests = 0
        self.error_replies: list[wire.Reply] = []
        self.results: dict[str, wire.Result] = {}    # first result per id
        self.result_count: collections.Counter = collections.Counter()
        self.other: list[wire.Message] = []
        self.accepted_at: dict[str, float] = {}      # monotonic times, for latencies
        self.answered_at: dict[str, float] = {}

    def close(self) -> None:
        self.socket.close(0)
        self.ctx.term()

    def offer(self, requests: list[wire.Request]) -> None:
        for r in requests:
            self.by_id[r.id] = r
        self.backlog.extend(requests)

    @property
    def answered(self) -> int:
        return len(self.results)

    def send_raw(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def step(self, timeout_ms: float = 50) -> None:
        now = time.monotonic()
        if self.backlog and not self.awaiting and now >= self.resend_after:
            chunk = [self.backlog.popleft() for _ in range(min(self.chunk, len(self.backlog)))]
            self.socket.send_multipart(wire.encode(wire.Submit(tuple(chunk))))
            self.awaiting.update(r.id for r in chunk)
        self.pump(timeout_ms)

    def pump(self, timeout_ms: float = 0) -> int:
        n = 0
        while self.socket.poll(timeout_ms if n == 0 else 0):
            self.handle(wire.decode(self.socket.recv_multipart()))
            n += 1
        return n

    def handle(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.Result):
            self.result_count[msg.id] += 1
            self.results.setdefault(msg.id, msg)
            self.answered_at.setdefault(msg.id, time.monotonic())
            self.awaiting.discard(msg.id)
        elif isinstance(msg, wire.Reply):
            self.awaiting.difference_update(msg.ids)
            if msg.status == "accepted":
                self.accepted.update(msg.ids)
                now = time.monotonic()
                for i in msg.ids:
                    self.accepted_at.setdefault(i, now)
            elif msg.status == "busy":
                self.busy_replies += 1
                self.busy_requests += len(msg.ids)
                self.backlog.extendleft(reversed([self.by_id[i] for i in msg.ids
                                                  if i in self.by_id]))
                self.resend_after = time.monotonic() + self.backoff_s
            else:
                self.error_replies.append(msg)
                if not msg.ids:
                    self.awaiting.clear()
        else:
            self.other.append(msg)

    def run_until(self, done, timeout_s: float, stall_s: float = 60.0) -> None:
        """Step until done(self) is true; fail on no new answer for `stall_s`."""
        deadline = time.monotonic() + timeout_s
        last, last_change = -1, time.monotonic()
        while not done(self):
            self.step()
            if self.answered != last:
                last, last_change = self.answered, time.monotonic()
            now = time.monotonic()
            if now > deadline or now - last_change > stall_s:
                missing = sorted(set(self.by_id) - set(self.results))[:10]
                raise TimeoutError(f"{self.answered}/{len(self.by_id)} answered; "
                                   f"unanswered e.g. {missing}")


# ---------------------------------------------------------------------------------------
# inputs


def ground_truths(photos: list[Path], folder: Path) -> dict[Path, Path]:
    """A palette ground truth of the right size for each photo (block pattern, 255 border)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for p in photos:
        with Image.open(p) as im:
            w, h = im.size
        gt = folder / f"{p.stem}.png"
        palette_ground_truth(h, w).save(gt)
        out[p] = gt
    return out


def linked_stream(photos: list[Path], folder: Path, n: int) -> list[Path]:
    """n distinct names (so n distinct masks) for the photos, reused in turn (hard links)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        src = photos[i % len(photos)]
        dst = folder / f"s{i:05d}_{src.stem}.jpg"
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                dst.write_bytes(src.read_bytes())
        out.append(dst)
    return out
