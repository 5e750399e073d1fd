"""The tests' one kit: start a daemon, talk to it, watch its processes, build inputs, check
what it wrote.

* `Daemon`: `pspnet serve` as a real process in its own session (JSON log to a file),
  optionally without root's file-permission override (`drop_dac`: an unreadable file is
  unreadable even when the suite runs as root, as CI does), with a limit on open files
  (`nofile`, as a service manager may set it) or extra environment (`env`).
* `Submitter`: the library client (daemon.client.Client) in a thread, keeping every answer,
  so a test can act mid-stream; `submit_all` runs one to the end in this thread.
* `RawClient`: a DEALER that speaks the wire format itself and keeps every message the
  daemon sends, so a test sees duplicates the library client would hide; `dealer` (a bare
  connection) and `status_over` (a status query on it: a barrier).
* `MemoryWatch`: resident memory of the front and each of its workers, from /proc.
* processes: `proc_kb`, `proc_status_field`, `pid_alive`, `wait_dead`, `kill9`, `fd_count`.
* inputs: `linked_stream` (n distinct names for a few photos), `ground_truths`,
  `requests`, `write_slowly`, `with_om` (a model directory with stand-in OMs for the
  fake aclruntime); `watch_record` reads watch mode's record of processed files.
* `mask_pixels`: the one check of a mask file (a palette PNG, of the image's size when
  given), returning its labels.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from PIL import Image

from pspnet.core import wire
from pspnet.daemon.client import Answer, Client, DaemonUnavailable
from pspnet.model.manifest import Manifest
from tests.bad_images import palette_ground_truth

REPO = Path(__file__).resolve().parents[1]
FAKE_ACL = REPO / "tests" / "fake_aclruntime"
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


# ---------------------------------------------------------------------------------------
# processes


def proc_status_field(pid: int, key: str) -> str | None:
    """A /proc/PID/status field as text, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return line.split(":", 1)[1].strip()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def proc_kb(pid: int, key: str = "VmRSS") -> int | None:
    """A /proc/PID/status size in kB (VmRSS, VmHWM), or None once the process is gone."""
    value = proc_status_field(pid, key)
    return None if value is None else int(value.split()[0])


def pid_alive(pid: int) -> bool:
    """Running or stopped; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = proc_status_field(pid, "State")
    return state is not None and not state.startswith("Z")


def wait_dead(pids: list[int], timeout_s: float = 10) -> list[int]:
    """The pids still alive after up to `timeout_s` (empty once all are gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def free_port() -> int:
    """A tcp port on 127.0.0.1 that the OS says is free now (a port derived from the pid
    can be one a leftover process or an outgoing connection holds)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill9(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def fd_count(pid: int) -> int | None:
    """Open descriptors of a process (/proc/PID/fd), or None once it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------
# the daemon


def _drop_dac() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _run_all(steps: list[Callable[[], object]]) -> None:  # in the child, before exec
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


class Daemon:
    """`pspnet serve` as a real process, in a session of its own (so its whole process
    group can be signalled or killed), logging JSON lines to a file under `tmp`.

    `drop_dac`: a daemon started by root loses CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so
    file modes apply to it as to any user. `nofile` (soft, hard): its RLIMIT_NOFILE (its
    workers inherit it). `env`: added to this process's environment. `log_to_pipe`: its
    log goes to a pipe (`proc.stdout`) that the test reads or closes, not to the file."""

    def __init__(self, model: Path, out: Path, tmp: Path, *extra: str, backend: str = "ort",
                 endpoint: str | None = None, drop_dac: bool = False,
                 env: dict[str, str] | None = None,
                 nofile: tuple[int, int] | None = None, log_to_pipe: bool = False) -> None:
        self.endpoint = endpoint or f"ipc://{tmp}/front"
        keys = os.environ.get("PSPNET_KEYS")       # tests/conftest.py's, for tcp
        if keys and "--keys" not in extra and (self.endpoint.startswith("tcp://")
                                               or "tcp" in extra):
            extra = (*extra, "--keys", keys)
        self.log_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        self.metrics = tmp / f"final-metrics-{time.monotonic_ns()}.json"
        cmd = [sys.executable, "-m", "pspnet", "serve", "--model", str(model),
               "--backend", backend, "--out", str(out), "--endpoint", self.endpoint,
               "--metrics-json", str(self.metrics), "--log-format", "json", *extra]
        self.log = open(self.log_path, "w")  # noqa: SIM115
        steps: list[Callable[[], object]] = \
            [_drop_dac] if drop_dac and os.geteuid() == 0 else []
        if nofile is not None:
            steps.append(functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE, nofile))
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE if log_to_pipe else self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
            preexec_fn=functools.partial(_run_all, steps) if steps else None)

    # ---- talking to it -----------------------------------------------------------------

    def wait_ready(self, timeout_s: float = 90) -> dict:
        """Its first status document, once it answers one."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.logs()}")
            try:
                with Client(self.endpoint) as client:
                    return client.status(timeout_s=1)
            except DaemonUnavailable:
                time.sleep(0.05)        # no socket file yet: the client says so at once
        raise TimeoutError(f"daemon not ready:\n{self.logs()}")

    def status(self) -> dict:
        with Client(self.endpoint) as client:
            return client.status()

    def child_pids(self) -> list[int]:
        return [pid for s in self.status()["stages"].values() for pid in s["pids"]]

    def wait_all_alive(self, timeout_s: float = 60) -> dict:
        """The status once every worker is alive (a restarted one is back)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if all(s["alive"] == s["processes"] for s in status["stages"].values()):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"children not back: {status['stages']}")
            time.sleep(0.1)

    # ---- its log -------------------------------------------------------------------------

    def logs(self) -> str:
        """The end of its log, for a failure message."""
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()[-6000:]

    def tail(self, lines: int = 6) -> str:
        """Its last log lines, for a short failure message."""
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def events(self) -> list[dict]:
        """Every JSON line of its log (lines that are not JSON are skipped)."""
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def started_pids(self) -> list[int]:
        """Every worker it has started, from its "child started" log lines."""
        return [e["pid"] for e in self.events() if e.get("event") == "child started"]

    # ---- signals and stopping ------------------------------------------------------------

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill_front(self, timeout_s: float = 10) -> None:
        """kill -9 the front alone (the daemon dying) and wait until its workers have
        followed it (the kernel ends them) or `timeout_s` has passed; the test asserts."""
        children = self.started_pids()
        kill9(self.proc.pid)
        self.proc.wait(10)
        wait_dead(children, timeout_s)

    def kill_group(self) -> None:
        """kill -9 the front and every worker at once (it runs in its own session), and
        remove the private run directory a killed front leaves: for a test's clean-up,
        where a worker may be stopped or the front hung."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.log.close()
        for event in self.events():
            if event.get("event") == "starting" and event.get("run_dir"):
                shutil.rmtree(event["run_dir"], ignore_errors=True)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM and wait for the drain; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill_group()
        self.log.close()
        return self.proc.returncode


# ---------------------------------------------------------------------------------------
# clients


class Submitter(threading.Thread):
    """The library client in the background, keeping every answer (and how many requests
    it resent to a restarted daemon), so a test can act mid-stream. `run()` called
    directly submits in this thread instead."""

    def __init__(self, endpoint: str, paths: list[Path], **submit_kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.paths, self.submit_kwargs = endpoint, paths, submit_kwargs
        self.answers: list[Answer] = []
        self.error: BaseException | None = None
        self.resubmitted = 0
        self.took_s = 0.0

    def run(self) -> None:
        started = time.monotonic()
        try:
            with Client(self.endpoint) as client:
                for answer in client.submit(self.paths, **self.submit_kwargs):
                    self.answers.append(answer)
                self.resubmitted = client.resubmitted
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        self.took_s = time.monotonic() - started

    def wait_for(self, count: int, timeout_s: float = 120) -> None:
        """Until `count` answers came (or the submit ended)."""
        deadline = time.monotonic() + timeout_s
        while len(self.answers) < count and self.is_alive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.answers)} answers, waited for {count}")
            time.sleep(0.02)


def submit_all(endpoint: str, paths: list[Path], **submit_kwargs: Any,
               ) -> tuple[list[Answer], float]:
    """The library client as a user runs it: every answer, and the seconds it took."""
    job = Submitter(endpoint, paths, **submit_kwargs)
    job.run()
    if job.error is not None:
        raise job.error
    return job.answers, job.took_s


class RawClient:
    """Submits over a DEALER and records every reply and result the daemon sends.

    `offer` queues requests; `step` sends the next chunk when the previous one was
    acknowledged (like daemon.client.Client) and reads whatever arrived. Busy chunks go
    back to the front of the backlog after `backoff_s`.
    """

    def __init__(self, endpoint: str, chunk: int = 64, backoff_s: float = 0.1) -> None:
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.DEALER)    # submits -> daemon ROUTER; all back
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
        if isinstance(msg, wire.Results):         # a turn's answers to this client
            for result in msg.each():
                self.handle(result)
        elif isinstance(msg, wire.Result):
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

    def run_until(self, done: Callable[[RawClient], bool], timeout_s: float,
                  stall_s: float = 60.0) -> None:
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


def dealer(ctx: zmq.Context, endpoint: str, identity: bytes | None = None) -> zmq.Socket:
    """One bare connection to the daemon, under `identity` when given."""
    sock = ctx.socket(zmq.DEALER)                    # -> daemon ROUTER
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    return sock


def status_over(sock: zmq.Socket, timeout_s: float = 20) -> dict:
    """A status query on a connection already made (a new one may be refused). Its reply
    comes after the replies to every earlier message on it: a barrier. Replies already
    waiting, and frames that do not decode, are skipped."""
    while sock.poll(0):
        sock.recv_multipart()
    sock.send_multipart(wire.encode(wire.StatusQuery()))
    deadline = time.monotonic() + timeout_s
    while sock.poll(max(0.0, deadline - time.monotonic()) * 1e3):
        try:
            msg = wire.decode(sock.recv_multipart())
        except wire.WireError:
            continue
        if isinstance(msg, wire.Reply) and msg.status == "status":
            return msg.body
    raise TimeoutError("no status reply")


# ---------------------------------------------------------------------------------------
# memory


class MemoryWatch(threading.Thread):
    """Samples VmRSS of the front and every worker (pids refreshed from `status`) until
    stopped; `peaks` maps "front" / "preprocess-<pid>" ... to the largest value in MB,
    the sampled RSS or the kernel's high-water mark (VmHWM), whichever is larger."""

    def __init__(self, daemon: Daemon, every_s: float = 0.2) -> None:
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
# inputs and outputs


def linked_stream(photos: list[Path], folder: Path, n: int, prefix: str = "s") -> list[Path]:
    """n distinct names (so n distinct masks) for the photos, reused in turn (hard links).
    Another `prefix` gives names whose masks cannot collide with this one's."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        src = photos[i % len(photos)]
        dst = folder / f"{prefix}{i:05d}_{src.stem}.jpg"
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                dst.write_bytes(src.read_bytes())
        out.append(dst)
    return out


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


def requests(prefix: str, paths: list[Path]) -> list[wire.Request]:
    """Wire requests with ids PREFIX-0, PREFIX-1, ... for these paths."""
    return [wire.Request(f"{prefix}-{i}", str(p)) for i, p in enumerate(paths)]


def write_slowly(path: Path, data: bytes, chunks: int = 4, pause_s: float = 0.3) -> None:
    """Write a file in chunks with pauses, flushed (as a slow copy or a download does)."""
    with open(path, "wb") as f:
        for i in range(chunks):
            f.write(data[i * len(data) // chunks:(i + 1) * len(data) // chunks])
            f.flush()
            time.sleep(pause_s)


def with_om(model_dir: Path, dest: Path, *, om_batch: dict[int, int] | None = None,
            precision: str = "fp32") -> Path:
    """A copy of `model_dir` whose manifest names a (fake) OM per batch size.

    The stand-in aclruntime (tests/fake_aclruntime) runs the `.onnx` beside each `.om`: the
    one the ATC script reads (the opset-13 copy where there is one), in fp32, so the
    manifest says the OMs were built with --om-precision `precision` (fp32 by default: what
    the stand-in computes in). `om_batch` maps a batch size to the batch size whose ONNX
    its OM should hold (to fake an OM built for the wrong batch). The OMs are 0640, as the
    ATC scripts leave them.
    """
    out = dest / f"{model_dir.name}_om"
    shutil.copytree(model_dir, out)
    manifest = Manifest.read(out)
    models = {}
    for n, files in manifest.models.items():
        source = manifest.models[(om_batch or {}).get(n, n)]
        om = f"fake_bs{n}.om"
        (out / om).write_bytes(b"fake OM\n")
        (out / om).chmod(0o640)
        shutil.copyfile(out / (source.atc_onnx or source.onnx), out / f"fake_bs{n}.onnx")
        models[n] = dataclasses.replace(files, om=om)
    dataclasses.replace(manifest, models=models, om_precision=precision).write(out)
    return out


def watch_record(out: Path) -> list[dict]:
    """Watch mode's record of processed files (MASKDIR/.pspnet-processed.jsonl), in order;
    empty before the first entry. A torn line (a full disk, a kill -9) is skipped, as the
    daemon skips it."""
    path = out / ".pspnet-processed.jsonl"
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def mask_pixels(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """The one check of a mask the daemon wrote: a whole, readable palette PNG (of `size`,
    (width, height), when given). Returns its labels."""
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.mode == "P", f"{path}: {im.format} {im.mode}"
        if size is not None:
            assert im.size == tuple(size), f"{path}: {im.size}, expected {tuple(size)}"
        return np.asarray(im)
