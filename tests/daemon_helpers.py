"""Start `pspnet serve` as a real process, talk to it, stop it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from daemon.client import Client, DaemonUnavailable


class Daemon:
    def __init__(self, model: Path, out: Path, tmp: Path, *extra: str, backend: str = "ort",
                 endpoint: str | None = None) -> None:
        self.endpoint = endpoint or f"ipc://{tmp}/front"
        self.log_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        self.metrics = tmp / "final-metrics.json"
        cmd = [sys.executable, "-m", "pspnet", "serve", "--model", str(model),
               "--backend", backend, "--out", str(out), "--endpoint", self.endpoint,
               "--metrics-json", str(self.metrics), "--log-format", "json", *extra]
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                     start_new_session=True)

    def wait_ready(self, timeout_s: float = 90) -> dict:
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

    def logs(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()[-6000:]

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill_all(self) -> None:
        """kill -9 the daemon alone; its children notice and exit within a heartbeat."""
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        time.sleep(1.5)

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill_all()
        self.log.close()
        return self.proc.returncode


class Submitter(threading.Thread):
    """Submit in the background and keep every answer, so a test can act mid-stream."""

    def __init__(self, endpoint: str, paths: list[Path], **kwargs) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.paths, self.kwargs = endpoint, paths, kwargs
        self.answers: list = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Client(self.endpoint) as client:
                for answer in client.submit(self.paths, **self.kwargs):
                    self.answers.append(answer)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def wait_for(self, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.answers) < count and self.is_alive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.answers)} answers, waited for {count}")
            time.sleep(0.05)
