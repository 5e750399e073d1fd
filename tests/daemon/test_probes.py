"""Issue 24: the probes on the metrics port (/healthz alive, /readyz 200 only when ready,
404 elsewhere: the port used to answer 200 with metrics on any path), and `pspnet
status` as people read it: a table on a terminal, JSON with a `ready` field otherwise."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
import urllib.error
import urllib.request

from pspnet.core.status import DaemonStatus, FrontStatus, StageStatus, Status
from pspnet.daemon.exporter import Snapshots, probes_app
from pspnet.daemon.status_table import status_table
from tests.kit import REPO, Daemon

READY_WAIT_S = 10.0           # liveness bound: snapshots come every 0.5 s


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def on_a_terminal(argv: list[str]) -> str:
    """What `argv` prints when its stdout is a terminal (a pseudo-terminal here)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdout=slave, stderr=subprocess.PIPE, cwd=REPO)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:                 # EIO: the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(60) == 0, proc.stderr.read()
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_probes_and_status_of_a_live_daemon(tiny_models, tmp_path):
    daemon = Daemon(tiny_models["labels"], tmp_path / "masks", tmp_path, "--metrics-port", "0",
                    "--preprocess-workers", "1", "--postprocess-workers", "1", backend="sim")
    try:
        daemon.wait_ready()
        (serving,) = [e for e in daemon.events() if e.get("event") == "serving"]
        base = serving["metrics"].removesuffix("/metrics")
        deadline = time.monotonic() + READY_WAIT_S
        while (ready := get(base + "/readyz"))[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready == (200, "ready\n"), ready
        assert get(base + "/healthz") == (200, "alive\n")
        code, text = get(base + "/nope")
        assert code == 404 and "/healthz" in text
        code, text = get(base + "/metrics")
        assert code == 200 and "pspnet_workers_up" in text
        status = [sys.executable, "-m", "pspnet", "status", "--endpoint", daemon.endpoint]
        doc = json.loads(subprocess.run(status, capture_output=True, text=True, check=True,
                                        timeout=60, cwd=REPO).stdout)
        assert doc["ready"] is True
        assert all(s["up"] == s["processes"] == 1 for s in doc["stages"].values())
        table = on_a_terminal(status)
        assert json.loads(on_a_terminal([*status, "--json"]))["ready"] is True
    finally:
        assert daemon.stop() == 0, daemon.logs()
    print("\n" + table)
    lines = table.splitlines()
    assert lines[0].split() == ["ready", "yes"], table
    assert any(line.startswith("plan ") and "sim fp32 on cpu" in line for line in lines)
    for stage in ("preprocess", "executor", "postprocess"):
        assert any(line.split()[:2] == [stage, "1/1"] for line in lines), table


def status_of(up: int, stopping: bool = False) -> Status:
    stages = {s: StageStatus(processes=1, alive=1, up=up if s == "executor" else 1)
              for s in ("preprocess", "executor", "postprocess")}
    status = Status(stages=stages, front=FrontStatus(),
                    daemon=DaemonStatus(pid=1, endpoint="ipc:///x", stopping=stopping))
    status.ready = status.readiness() is None
    return status


def test_readyz_says_why_not():
    """Not ready while a worker loads its model (alive, not heard from yet) or while
    draining; alive (healthz 200) all the while; 503 before the first status."""
    snapshots = Snapshots()
    app = probes_app(lambda e, s: [b""], snapshots)

    def probe(path: str) -> tuple[str, str]:
        said = []
        body = app({"PATH_INFO": path}, lambda code, headers: said.append(code))
        return said[0], b"".join(body).decode().strip()

    assert probe("/readyz") == ("503 Service Unavailable", "not ready: starting")
    assert probe("/healthz") == ("200 OK", "alive, starting")
    snapshots.add(time.monotonic(), status_of(up=0))
    assert probe("/readyz") == ("503 Service Unavailable", "not ready: executor 0/1 up")
    snapshots.add(time.monotonic(), status_of(up=1))
    assert probe("/readyz") == ("200 OK", "ready")
    snapshots.add(time.monotonic(), status_of(up=1, stopping=True))
    assert probe("/readyz") == ("503 Service Unavailable", "not ready: draining")
    assert probe("/healthz") == ("200 OK", "alive")
    assert probe("/health")[0] == "404 Not Found"
    assert status_table(status_of(up=1, stopping=True)).splitlines()[0].split() == \
        ["ready", "no", "(draining)"]


def test_the_table_counts_reloads_apart_from_images():
    """Refused reloads are not refused images: the model row counts them."""
    status = status_of(up=1)
    status.model = {"version": "abc123", "dir": "/m", "reload": None, "reloads": 1,
                    "failed_reloads": 2, "refused_reloads": 3}
    rows = {line.split()[0]: line for line in status_table(status).splitlines() if line.strip()}
    assert rows["model"].endswith("abc123 (/m); reloads 1 done, 2 failed, 3 refused")
    assert rows["answered"].split()[-2:] == ["0", "refused"]
    status.model |= {"reloads": 0, "failed_reloads": 0, "refused_reloads": 0}
    assert "reloads" not in status_table(status)
